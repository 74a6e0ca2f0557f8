"""``python3 -m tcprelay PROGRAM [ARGS...]``: run one of tcprelay's programs by name.

The same entry point runs the one-file form, ``python3 tcprelay.pyz PROGRAM``
(scripts/build_zipapp.py). Each program is also its own module:
``python3 -m tcprelay.relay`` is ``python3 -m tcprelay relay``.
"""

import importlib
import os
import sys
import zipimport

from . import __version__, cli

# name -> (module, what it is, its arguments); in the order --help lists them.
PROGRAMS = [
    ("relay", "tcprelay.relay", "the relay", "PORT [options]"),
    ("echoserver", "tcprelay.echoserver", "a service that echoes, the example",
     "RELAY_HOST RELAY_PORT [options]"),
    ("adapter", "tcprelay.adapter", "the adapter, for any TCP service",
     "RELAY_HOST RELAY_PORT LOCAL_HOST:LOCAL_PORT [options]"),
    ("status", "tcprelay.status", "what a relay started with --status is doing, as tables",
     "[URL] [--token-file PATH]"),
]
MODULES = dict((name, module) for name, module, _, _ in PROGRAMS)


def invoked_as():
    """How the user ran us: ``tcprelay.pyz`` (the zipapp's file name) or ``python3 -m tcprelay``."""
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    # python3 -m tcprelay with the zipapp on PYTHONPATH: argv[0] is .../__main__.py.
    if isinstance(globals().get("__loader__"), zipimport.zipimporter) \
            and script and not script.endswith(".py"):
        return script
    return "python3 -m tcprelay"


def usage(prog):
    lines = ["usage: %s PROGRAM [ARGS...]" % prog, "",
             "PROGRAM is one of tcprelay's programs (each takes --help; README.md",
             "shows them at work):"]
    for name, _, what, arguments in PROGRAMS:
        lines += ["  %-11s %s:" % (name, what), "      %s %s %s" % (prog, name, arguments)]
    modules = ["python3 -m %s" % module for _, module, _, _ in PROGRAMS]
    lines += ["The same programs as modules, with tcprelay on the path:",
              "  %s," % ", ".join(modules[:2]), "  %s" % ", ".join(modules[2:])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    """Run the program ``argv[0]`` names with the rest of ``argv`` (default:
    sys.argv[1:]); its exit code. No program: the usage on stderr, exit 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = invoked_as()
    if not argv:
        sys.stderr.write(usage(prog))
        return 2
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help"):
        sys.stdout.write(usage(prog))
        return 0
    if name == "--version":
        sys.stdout.write("%s (tcprelay) %s\n" % (prog, __version__))
        return 0
    if name not in MODULES:
        sys.stderr.write("%s: error: unknown program %r; choose from %s (see --help)\n"
                         % (prog, name, ", ".join(n for n, _, _, _ in PROGRAMS)))
        return 2
    program = importlib.import_module(MODULES[name])
    saved, cli.invoked_as = cli.invoked_as, "%s %s" % (prog, name)
    try:
        return program.main(rest)
    finally:
        cli.invoked_as = saved


if __name__ == "__main__":
    sys.exit(main())
