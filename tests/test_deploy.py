"""Deployment (issue 18): the programs by name, the one-file zipapp, the systemd units.

- ``python3 -m tcprelay PROGRAM`` runs relay, echoserver, adapter and status;
  --help lists them; an unknown one is a one-line error (exit 2) naming them;
  a program run by name calls itself by that name in usage and errors;
- ``scripts/build_zipapp.py`` builds a zipapp of tcprelay/*.py alone, with the
  /usr/bin/env python3 shebang, and a relay and an echo server run from it
  carry a client's bytes there and back (under the interpreter running the tests);
- nothing in tcprelay reads files next to its modules (which a zip has not);
- contrib/systemd's units: their ExecStart lines parse with the programs' own
  parsers, they drain within TimeoutStopSec, carry the hardening the issue
  lists, and ``systemd-analyze verify`` finds nothing to say (where it exists).

Every subprocess and socket wait has a timeout; relays bind 127.0.0.1 only.
"""

import configparser
import glob
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import zipfile

import pytest

from helpers.basics import LOOPBACK, ROOT, TIMEOUT, free_port_range, pool_args, wait_until
from helpers.processes import MainRun, assert_no_traceback, quick
from helpers.relay import echo_roundtrip
from tcprelay import adapter, cli, echoserver, relay as relay_module

PROGRAMS = ["relay", "echoserver", "adapter", "status"]
BUILD_SCRIPT = os.path.join(ROOT, "scripts", "build_zipapp.py")
UNITS_DIR = os.path.join(ROOT, "contrib", "systemd")


# -- python3 -m tcprelay PROGRAM -------------------------------------------------------------

@pytest.mark.parametrize("program", PROGRAMS)
def test_each_program_runs_by_name_and_calls_itself_so(program):
    run = MainRun("tcprelay.__main__", [program, "--help"])
    assert run.wait() == 0, run.stderr_text()
    assert run.stdout_rest().startswith("usage: python3 -m tcprelay %s " % program), \
        run.stdout_rest()


def test_help_lists_every_program_in_both_forms():
    run = MainRun("tcprelay.__main__", ["--help"])
    assert run.wait() == 0, run.stderr_text()
    text = run.stdout_rest()
    for program in PROGRAMS:
        assert "python3 -m tcprelay %s " % program in text, text
        assert "python3 -m tcprelay.%s" % program in text, text


def test_an_unknown_program_is_one_line_naming_the_choices():
    run = MainRun("tcprelay.__main__", ["relya", "8080"])
    assert run.wait() == 2
    assert run.stdout_rest() == ""
    lines = run.stderr_lines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("python3 -m tcprelay: error: unknown program 'relya'"), lines
    for program in PROGRAMS:
        assert program in lines[0], lines


def test_an_argument_error_names_the_program_as_run_and_the_name_does_not_stick():
    run = MainRun("tcprelay.__main__", ["relay", "--lease-time", "soon", "8080"])
    assert run.wait() == 2
    lines = run.stderr_lines()
    assert lines[-1].startswith("python3 -m tcprelay relay: error: argument --lease-time"), lines
    # Run by its own module afterwards, a program calls itself that again.
    assert cli.invoked_as is None
    for module in (relay_module, echoserver, adapter):
        assert module.build_parser().prog.startswith("python3 -m tcprelay."), module


def test_python_m_tcprelay_relay_and_echoserver_carry_bytes(procs):
    ports = free_port_range(3)
    relay = procs.start("tcprelay", "relay", ports[0], "--host", LOOPBACK,
                        "--public-bind", LOOPBACK, *quick(*pool_args(ports[1:])))
    wait_until(lambda: not relay.alive() or "listening for services" in relay.stderr_text(),
               what="the relay to start")
    assert relay.alive(), relay.stderr_text()
    echo = procs.start("tcprelay", "echoserver", LOOPBACK, ports[0])
    assert echo.readline() == "%s:%d" % (LOOPBACK, ports[1]), echo.stderr_text()
    assert echo_through(ports[1], b"by name\n") == b"by name\n"


@pytest.mark.parametrize("form", [["tcprelay.relay"], ["tcprelay", "relay"]],
                         ids=["module", "by-name"])
def test_the_relays_lines_say_tcprelay_relay_however_it_is_run(procs, form):
    # Run as python3 -m tcprelay.relay, the module is __main__: its lines said
    # "__main__" where the rest of the relay's say "tcprelay.relay".
    ports = free_port_range(3)
    relay = procs.start(form[0], *(form[1:] + [ports[0], "--host", LOOPBACK, "--public-bind",
                                             LOOPBACK] + quick(*pool_args(ports[1:]))))
    wait_until(lambda: not relay.alive() or "listening for services" in relay.stderr_text(),
               what="the relay to start")
    line = [l for l in relay.stderr_lines() if "listening for services" in l][0]
    assert " tcprelay.relay: " in line, line
    assert "__main__" not in relay.stderr_text(), relay.stderr_text()


def echo_through(port, data):
    """What comes back from 127.0.0.1:``port`` for ``data``, sent then half-closed."""
    client = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT)
    try:
        client.settimeout(TIMEOUT)
        return echo_roundtrip(client, data)
    finally:
        client.close()


# -- the zipapp --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zipapp_path(tmp_path_factory):
    """scripts/build_zipapp.py's archive, built once into a temporary folder (not dist/)."""
    output = str(tmp_path_factory.mktemp("zipapp") / "tcprelay.pyz")
    result = subprocess.run([sys.executable, BUILD_SCRIPT, "--output", output], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == output
    return output


def test_the_zipapp_holds_the_modules_alone_behind_a_python3_shebang(zipapp_path):
    with open(zipapp_path, "rb") as f:
        assert f.readline() == b"#!/usr/bin/env python3\n"
    modules = sorted("tcprelay/" + os.path.basename(path)
                     for path in glob.glob(os.path.join(ROOT, "tcprelay", "*.py")))
    with zipfile.ZipFile(zipapp_path) as archive:
        files = sorted(n for n in archive.namelist() if not n.endswith("/"))   # not folders
        assert files == ["__main__.py"] + modules
    assert os.stat(zipapp_path).st_mode & 0o100, "not executable"


def test_a_relay_and_an_echo_server_run_from_the_zipapp(procs, zipapp_path):
    # python3 FILE.pyz puts the archive first on sys.path, and not the working
    # folder: tcprelay comes from the archive (and fails if a module is missing).
    command = [sys.executable, zipapp_path]
    ports = free_port_range(3)
    relay = procs.start(None, "relay", ports[0], "--host", LOOPBACK, "--public-bind", LOOPBACK,
                        *quick(*pool_args(ports[1:])), command=command)
    wait_until(lambda: not relay.alive() or "listening for services" in relay.stderr_text(),
               what="the relay to start")
    assert relay.alive(), relay.stderr_text()
    echo = procs.start(None, "echoserver", LOOPBACK, ports[0], command=command)
    address = echo.readline()
    assert address == "%s:%d" % (LOOPBACK, ports[1]), echo.stderr_text()
    data = os.urandom(64 * 1024)
    assert echo_through(ports[1], data) == data
    for process in (echo, relay):
        process.send_signal(signal.SIGTERM)
        assert process.wait() == 0, process.stderr_text()
        assert_no_traceback(process)


def test_nothing_in_tcprelay_reads_files_next_to_its_modules():
    # A zipapp has no files beside its modules: __file__-relative paths break there.
    patterns = [r"__file__", r"\bpkgutil\b", r"importlib\.resources", r"\bpkg_resources\b",
                r"__path__", r"os\.path\.dirname", r"\bsys\.path\b"]
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tcprelay", "*.py"))):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if any(re.search(p, line) for p in patterns):
                    found.append("%s:%d: %s" % (os.path.basename(path), number, line.strip()))
    assert not found, found


# -- the systemd units -------------------------------------------------------------------------

UNITS = ["tcprelay-relay.service", "tcprelay-adapter@.service"]
# What a unit's ${VAR} and $VAR stand for when the test parses its command line:
# the credentials folder systemd makes, the adapter's example environment file.
EXAMPLE_ENVIRONMENT = {"CREDENTIALS_DIRECTORY": "/run/credentials/x.service",
                       "RELAY_HOST": "relay.example.com", "RELAY_PORT": "8080",
                       "LOCAL": "127.0.0.1:5432", "OPTIONS": "--port 8085"}
HARDENING = {"DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
             "CapabilityBoundingSet": "", "Restart": "on-failure"}


def read_unit(name):
    """The [Service] section of contrib/systemd/``name`` as a dict."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str   # systemd's keys are case-sensitive
    with open(os.path.join(UNITS_DIR, name), encoding="utf-8") as f:
        parser.read_file(f)
    return dict(parser["Service"])


def command_line(unit):
    """The unit's ExecStart as argv, its variables and %i filled in as systemd would."""
    def expand(match):
        return EXAMPLE_ENVIRONMENT[match.group(1) or match.group(2)]
    words = []
    for word in shlex.split(unit["ExecStart"]):
        unbraced = re.match(r"^\$(\w+)$", word)
        if unbraced:   # $VAR: split at whitespace, as systemd does
            words += EXAMPLE_ENVIRONMENT[unbraced.group(1)].split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}|\$(\w+)", expand, word).replace("%i", "db"))
    return words


@pytest.mark.parametrize("name, module", [("tcprelay-relay.service", relay_module),
                                          ("tcprelay-adapter@.service", adapter)])
def test_a_units_command_line_parses_with_its_programs_parser(name, module):
    unit = read_unit(name)
    argv = command_line(unit)
    assert argv[:2] == ["/usr/bin/python3", "/usr/local/lib/tcprelay/tcprelay.pyz"], argv
    assert argv[2] == module.__name__.split(".")[-1], argv
    try:
        args = module.build_parser().parse_args(argv[3:])
    except SystemExit:
        pytest.fail("%s: the ExecStart options do not parse (stderr above): %s" % (name, argv))
    # The secret is the credential systemd loads, read where systemd puts it.
    credential, _, source = unit["LoadCredential"].partition(":")
    assert args.secret_file == "%s/%s" % (EXAMPLE_ENVIRONMENT["CREDENTIALS_DIRECTORY"],
                                          credential), args.secret_file
    assert source.startswith("/etc/tcprelay/"), source
    if module is relay_module:
        # SIGKILL comes at TimeoutStopSec: the drain must end well before it.
        assert args.drain_timeout + 5 <= float(unit["TimeoutStopSec"]), unit["TimeoutStopSec"]


@pytest.mark.parametrize("name", UNITS)
def test_a_unit_has_the_hardening_the_issue_lists(name):
    unit = read_unit(name)
    for key, value in HARDENING.items():
        assert unit.get(key) == value, (key, unit.get(key))
    assert set(unit["RestrictAddressFamilies"].split()) <= {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert unit.get("KillSignal", "SIGTERM") == "SIGTERM"


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path, name):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (it comes with systemd)")
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("the units run /usr/bin/python3, which this machine lacks: "
                    "verify would say only that")
    # A template is verified as an instance of it.
    target = str(tmp_path / name.replace("@.", "@db."))
    shutil.copy(os.path.join(UNITS_DIR, name), target)
    result = subprocess.run([analyze, "verify", target], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    said = [line for line in result.stdout.splitlines() if "tcprelay" in line]
    assert result.returncode == 0 and not said, result.stdout


def test_an_abbreviated_option_is_an_error_not_another_option():
    # argparse took --port for --ports (a one-port pool), silently.
    run = MainRun("tcprelay.relay", ["8700", "--port", "8701"])
    assert run.wait() == 2
    assert "unrecognized arguments: --port 8701" in run.stderr_text(), run.stderr_text()


def test_a_status_port_inside_the_pool_is_an_error_at_start():
    # It was taken, and the pool skipped that port later with a warning.
    run = MainRun("tcprelay.relay", ["8700", "--status", "8701"])
    assert run.wait() == 2
    assert "--status port 8701 is in the public port pool" in run.stderr_text()


def test_access_log_dash_is_a_usage_error_not_a_file_named_dash(tmp_path, monkeypatch):
    monkeypatch.chdir(str(tmp_path))
    run = MainRun("tcprelay.relay", ["8700", "--access-log", "-"])
    assert run.wait() == 2
    assert "/dev/stdout" in run.stderr_text()
    assert not (tmp_path / "-").exists()
