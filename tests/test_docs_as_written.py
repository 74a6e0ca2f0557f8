"""The README and docs as written (issue 12): what they promise that a test can hold.

- the README's test command tells a user whose pip refuses (Debian's
  "externally managed" Python) to use a venv, and exits non-zero, instead of
  running pytest into "No module named pytest"; where pip works it still runs;
- the README names every console script setup.py installs, and lists every
  relay option in tables grouped as ``--help`` groups them;
- the security example's local variant runs as written: every file its
  commands read is made by an earlier line, and every command line parses;
- .gitignore keeps secrets and keys out of git;
- the registration lines carry whole durations as JSON integers (Go's decoder
  refuses ``30.0`` for an int field), fractions to the millisecond, and Go's
  bin-v2-service (when ../shared is there) registers with them;
- what docs/PROTOCOL.md tells a minimal client and an HMAC answerer holds.

Every subprocess and socket wait has a timeout; relays bind 127.0.0.1 only.
"""

import fnmatch
import json
import os
import re
import selectors
import shlex
import stat
import subprocess
import textwrap
import time

import pytest

from helpers.basics import ROOT, TIMEOUT
from helpers.docs import help_groups, listed, option_tables, readme, section
from helpers.relay import recv_to_eof
from tcprelay import adapter, auth, echoserver, registration, relay as relay_module
from tcprelay.service import connect


@pytest.fixture
def env(relay_env):
    """This module's tests run in a Env (conftest)."""
    return relay_env


GO_SERVICE = os.path.join(os.path.dirname(ROOT), "shared", "go-peers", "bin-v2-service")


# -- the test command (item 16) ----------------------------------------------------------------

def readme_test_command():
    """The README's test command, found as .ci/run finds it."""
    lines = readme().splitlines()
    at = [i for i, line in enumerate(lines) if "<!-- test-command -->" in line]
    assert len(at) == 1, "one <!-- test-command --> marker"
    assert lines[at[0] + 1].strip() == "```"
    command = lines[at[0] + 2].strip()
    assert command.startswith("python3"), command
    return command


# A stand-in python3: ``import pytest`` fails until the marker file exists; pip
# "installs" pytest (makes the marker) or refuses as Debian's does; "pytest"
# prints a line saying it ran.
FAKE_PYTHON = textwrap.dedent("""\
    #!/bin/sh
    dir=$(dirname "$0")
    echo "$*" >> "$dir/calls"
    case "$*" in
        "-c import pytest")
            [ -e "$dir/installed" ] && exit 0
            echo "ModuleNotFoundError: No module named 'pytest'" >&2; exit 1 ;;
        "-m pip install"*)
            if [ "$PIP" = works ]; then touch "$dir/installed"; exit 0; fi
            echo "error: externally-managed-environment" >&2; exit 1 ;;
        "-m pytest"*)
            [ -e "$dir/installed" ] || { echo "No module named pytest" >&2; exit 1; }
            echo "fake pytest ran"; exit 0 ;;
    esac
    echo "unexpected: $*" >&2; exit 3
""")


def run_test_command(tmp_path, pip, installed=False):
    shim = tmp_path / "bin"
    shim.mkdir()
    python = shim / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    if installed:
        (shim / "installed").write_text("")
    environ = dict(os.environ, PATH="%s:%s" % (shim, os.environ.get("PATH", "")), PIP=pip)
    done = subprocess.run(["bash", "-c", readme_test_command()], cwd=ROOT, env=environ,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=TIMEOUT)
    calls_file = shim / "calls"
    calls = calls_file.read_text().splitlines() if calls_file.exists() else []
    return done, calls


def test_test_command_says_use_a_venv_when_pip_refuses(tmp_path):
    done, calls = run_test_command(tmp_path, pip="refuses")
    assert done.returncode != 0, (done.stdout, done.stderr)
    assert "No module named pytest" not in done.stderr, "it ran pytest anyway: %r" % done.stderr
    assert not any(call.startswith("-m pytest") for call in calls), calls
    advice = done.stderr.strip().splitlines()[-1]
    assert "python3 -m venv .venv" in advice and ". .venv/bin/activate" in advice, advice


def test_test_command_installs_pytest_where_pip_works(tmp_path):
    done, calls = run_test_command(tmp_path, pip="works")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "fake pytest ran" in done.stdout
    assert [call.split()[:3] for call in calls] == [
        ["-c", "import", "pytest"], ["-m", "pip", "install"], ["-m", "pytest", "-q"]]


def test_test_command_runs_pytest_at_once_when_it_is_there(tmp_path):
    done, calls = run_test_command(tmp_path, pip="refuses", installed=True)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "fake pytest ran" in done.stdout
    assert not any("pip" in call for call in calls), calls


def test_readme_tells_what_to_do_when_pip_refuses():
    text = readme()
    assert "externally" in text and "python3 -m venv .venv && . .venv/bin/activate" in text


# -- console scripts and the relay's options (item 17) ----------------------------------------

def test_readme_names_every_console_script():
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        scripts = re.findall(r'"([\w-]+) = tcprelay\.\w+:main"', f.read())
    assert len(scripts) >= 3, scripts
    deployment = "\n".join(section(readme(), "## Deployment: copy it in"))
    missing = [name for name in scripts if "`%s`" % name not in deployment]
    assert not missing, "console scripts the README does not name: %s" % missing


def test_readme_relay_options_are_every_option_grouped_as_help():
    lines = section(readme(), "### The relay's options")
    groups = help_groups(relay_module.build_parser())
    assert option_tables(lines) == [options for _, options in groups]
    text = "\n".join(lines)
    for title, _ in groups[1:]:
        title = title.split(" (")[0]
        assert '"%s"' % title in text, "the README does not name the group %r" % title


def test_readme_relay_option_defaults_match_help():
    """Each row's default is the one ``--help`` gives."""
    parser = relay_module.build_parser()
    rows = {}
    for line in section(readme(), "### The relay's options"):
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`--"):
            rows[cells[0].strip("`").split()[0]] = cells[1]
    for action in parser._actions:
        if not listed(action):
            continue
        said = re.search(r"\(default: ([^)]*)\)", action.help or "")
        if said:
            row = rows[action.option_strings[-1]].strip("`").replace(",", "")
            assert row == said.group(1), (action.option_strings[-1], row, said.group(1))


def test_readme_adapter_options_are_every_option():
    lines = section(readme(), "## Exposing any TCP service: the adapter")
    tables = option_tables(lines)
    assert len(tables) == 1, tables
    wanted = [option for _, options in help_groups(adapter.build_parser()) for option in options]
    assert sorted(tables[0]) == sorted(wanted)


# -- the security example (items 14, 15) -------------------------------------------------------

def security_blocks():
    """The shell blocks of the README's Security section, each a list of commands
    (``$ `` lines with their ``\\`` continuations)."""
    blocks, current, command = [], None, None
    for line in section(readme(), "## Security"):
        if line.strip() == "```":
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
            continue
        if current is None:
            continue
        if command is not None:
            command += " " + line.strip().rstrip("\\").strip()
            if not line.rstrip().endswith("\\"):
                current.append(command)
                command = None
        elif line.startswith("$ "):
            command = line[2:].rstrip().rstrip("\\").strip()
            if not line.rstrip().endswith("\\"):
                current.append(command)
                command = None
    return blocks


PARSERS = {"tcprelay.relay": relay_module.build_parser, "tcprelay.echoserver": echoserver.build_parser,
           "tcprelay.adapter": adapter.build_parser}


def test_security_local_variant_runs_on_one_machine():
    """The first Security block: files come from earlier lines, the relay lets
    loopback in, the service trusts the self-signed certificate by --tls-ca."""
    local = security_blocks()[0]
    made = set()
    relay_args = service_args = None
    for command in local:
        words = shlex.split(command.rstrip("&").strip())
        if words[0] == "openssl":
            made.update(words[i + 1] for i, word in enumerate(words) if word in ("-keyout", "-out"))
            assert "DNS:localhost" in command, "the certificate must name localhost"
        elif ">" in words:
            made.add(words[words.index(">") + 1])
        elif words[:2] == ["python3", "-m"] and words[2] in PARSERS:
            args = PARSERS[words[2]]().parse_args(words[3:])
            for name in ("secret_file", "tls_cert", "tls_key", "tls_ca"):
                path = getattr(args, name, None)
                assert path is None or path in made, "%s reads %s, which no line made" % (
                    words[2], path)
            if words[2] == "tcprelay.relay":
                relay_args = args
            else:
                service_args = args
    assert relay_args is not None and service_args is not None, local
    assert any(network.startswith("127.") for network in relay_args.allow_from)
    assert service_args.relay_host == "localhost" and service_args.tls and service_args.tls_ca


def test_gitignore_keeps_secrets_and_keys_out():
    with open(os.path.join(ROOT, ".gitignore"), encoding="utf-8") as f:
        patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    for name in ("relay.secret", "cert.pem", "key.pem", "server.key"):
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


# -- numbers in the registration lines (item 18) -----------------------------------------------

def raw_lines(registration_):
    """The relay's next reply, as the raw JSON text and as a dict."""
    reply = registration_.reply()
    return json.dumps(reply), reply


def test_whole_durations_are_json_integers(env):
    relay = env.relay(ports=1, keepalive=30.0, lease_time=30.0, waiting_interval=3.0)
    first = env.service(relay)
    holder = first.register({"heartbeat": True})
    reply = holder.reply()
    assert reply["status"] == "ok"
    assert type(reply["lease_seconds"]) is int and reply["lease_seconds"] == 30, reply
    assert reply["heartbeat"] == {"interval": 10, "timeout": 30}
    assert all(type(value) is int for value in reply["heartbeat"].values()), reply
    second = env.service(relay)
    waiter = second.register({"notices": True})
    line = waiter.reply()
    assert line["status"] == "waiting" and line["interval"] == 3, line
    assert type(line["interval"]) is int, line


def test_fractional_durations_are_rounded_to_the_millisecond(env):
    # Two ports: the second service must not wait in line for the first's 4 s heartbeat timeout.
    relay = env.relay(ports=2, keepalive=4.0, lease_time=0.25)
    service = env.service(relay)
    registration_ = service.register({"heartbeat": True})
    reply = registration_.reply()
    assert reply["heartbeat"] == {"interval": 1.333, "timeout": 4}, reply
    assert reply["lease_seconds"] == 0.25
    # Our own service library takes these terms.
    connection = connect(relay.server_address, timeout=TIMEOUT, heartbeat=True, name="frac")
    try:
        assert connection.reply["heartbeat"] == {"interval": 1.333, "timeout": 4}
    finally:
        connection.close()


@pytest.mark.parametrize("value, sent", [
    (30.0, "30"), (10, "10"), (4 / 3.0, "1.333"), (0.5, "0.5"), (0.0001, "0.0001"),
    (2.0 ** 60, "1.152921504606847e+18"),
])
def test_seconds_in_json(value, sent):
    assert json.dumps(registration.seconds(value)) == sent


def test_max_wait_goes_out_as_an_integer_when_whole():
    line = registration.Request(max_wait=30.0).encode()
    assert b'"max_wait": 30,' in line or b'"max_wait": 30}' in line, line


@pytest.mark.skipif(not os.access(GO_SERVICE, os.X_OK),
                    reason="../shared/go-peers/bin-v2-service is absent (a fresh clone)")
@pytest.mark.parametrize("keepalive", [30.0, 4.0])
def test_go_service_takes_the_ok_line_with_the_heartbeat(env, keepalive):
    """Go's bin-v2-service (extended form, heartbeat) registers and prints its address."""
    relay = env.relay(ports=1, keepalive=keepalive)
    environ = dict(os.environ, EXTENDED="1", EXT_HEARTBEAT="1")
    service = subprocess.Popen([GO_SERVICE, "%s:%d" % relay.server_address[:2], "echo"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=environ)
    try:
        out = bytearray()
        deadline = time.monotonic() + TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(service.stdout, selectors.EVENT_READ)
            while b"\n" not in out and time.monotonic() < deadline:
                if selector.select(max(0.0, deadline - time.monotonic())):
                    chunk = os.read(service.stdout.fileno(), 4096)
                    if not chunk:
                        break
                    out += chunk
        assert service.poll() is None, "bin-v2-service exited: %r" % service.communicate(
            timeout=TIMEOUT)[1]
        assert bytes(out).split(b"\n")[0] == b"127.0.0.1:%d" % relay.pool.ports[0], out
    finally:
        if service.poll() is None:
            service.terminate()
        service.communicate(timeout=TIMEOUT)


# -- what docs/PROTOCOL.md 2.1 says a minimal client meets ------------------------------------

def test_a_minimal_service_past_max_waiting_reads_an_error_line(env):
    relay = env.relay(ports=1, max_waiting=1)
    env.service(relay).register_ok()        # holds the only port
    waiter = env.service(relay).register({"notices": True})
    assert waiter.reply()["status"] == "waiting"
    reply = env.service(relay).register_minimal()
    assert reply.startswith(b"{"), reply
    body = json.loads(reply.decode("utf-8"))
    assert body["status"] == "error" and "waiting" in body["error"], body


def test_a_minimal_service_that_never_half_closes_gets_an_error_not_an_address(env):
    """The 2014 service's way (open, write nothing, wait): no FIN, no address."""
    relay = env.relay(ports=1, handshake_timeout=0.5)
    service = env.service(relay)
    stream = service.session.open(announce=True)
    stream.settimeout(TIMEOUT)
    try:
        reply = recv_to_eof(stream)
    finally:
        stream.close()
    assert json.loads(reply.decode("utf-8"))["status"] == "error", reply


def test_an_uppercase_hmac_answer_is_refused(env):
    secret = b"s" * 32
    relay = env.relay(ports=1, secret=secret)
    registration_ = env.service(relay).register({"auth": "hmac-sha256"})
    challenge = registration_.reply()
    nonce = bytes.fromhex(challenge["nonce"])
    answer = auth.answer(secret, nonce)
    registration_.stream.sendall(b'{"hmac": "%s"}\n' % answer.upper().encode("ascii"))
    assert registration_.reply() == {"status": "error", "error": "authentication failed"}
