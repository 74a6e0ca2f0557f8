"""What the command-line programs share: the parser (one-line errors,
--version), argument types, logging, and a Ctrl-C while starting. The life of
a service process is in ``servicecli``; the relay's own options in ``relay``."""

import argparse
import functools
import logging
import os
import signal
import sys
import threading

from . import __version__, addresses, limits

LOG_LEVELS = ["debug", "info", "warning", "error"]

# The name a program goes by in its usage and errors when ``python3 -m tcprelay
# PROGRAM`` (or the zipapp) runs it, such as "tcprelay.pyz relay"; set by __main__.
invoked_as = None


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2), as the CLIs promise, and --version."""

    def __init__(self, *args, **kwargs):
        # Run by name (python3 -m tcprelay relay) or as a console script
        # (tcprelay-relay): say so in usage and errors.
        script = os.path.basename(sys.argv[0]) if sys.argv else ""
        if invoked_as:
            kwargs["prog"] = invoked_as
        elif script.startswith("tcprelay-"):
            kwargs["prog"] = script
        # No abbreviations: --port would silently be taken for --ports.
        kwargs.setdefault("allow_abbrev", False)
        argparse.ArgumentParser.__init__(self, *args, **kwargs)
        self.add_argument("--version", action="version",
                          version="%%(prog)s (tcprelay) %s" % __version__)

    def error(self, message):
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def interruptible(main):
    """``main(argv)`` with a Ctrl-C that comes while no handler of ours is set
    (starting up) ending it with one line and exit code 130, not a
    KeyboardInterrupt traceback."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            return 130
    return run


def configure_logging(level):
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def port_number(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a port number" % text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("%r is not a port number (1-65535)" % text)
    return value


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a number" % text)
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError("%r is not a finite number" % text)
        if value <= 0:
            raise argparse.ArgumentTypeError("%r must be more than 0" % text)
        return value
    return parse


def status_address(text):
    """``(host, port)`` of ``--status``: HOST:PORT, [V6]:PORT, or a bare PORT on 127.0.0.1."""
    try:
        return addresses.split_host_port(text, default_host="127.0.0.1")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def port_range(text):
    try:
        low, _, high = text.partition("-")
        low = int(low)
        high = int(high) if high else low
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a port range like 8081-8130" % text)
    if not 1 <= low <= high <= 65535:
        raise argparse.ArgumentTypeError("%r is not a port range within 1-65535" % text)
    return range(low, high + 1)


def non_negative(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % text)
    if value != value or value == float("inf"):
        raise argparse.ArgumentTypeError("%r is not a finite number" % text)
    if value < 0:
        raise argparse.ArgumentTypeError("%r must not be negative" % text)
    return value


def host(text):
    try:
        return addresses.host_option(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def public_host(text):
    try:
        return addresses.public_host(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def network(text):
    try:
        limits.Networks([text])
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a network like 10.0.0.0/8" % text)
    return text


def on_stop_signals(logger, stopping, first, second):
    """SIGINT and SIGTERM: the first runs ``first()``, the second ``second()``.

    Each runs on a thread of its own, not in the handler: the main thread,
    which the handler interrupts, may hold the locks they take (and a
    ``shutdown()`` waits for it). ``stopping`` says what the first does, in
    ``logger``'s line. Returns the list the signals received are appended to.
    """
    signalled = []

    def stop(signum, frame):
        signalled.append(signum)
        if len(signalled) == 1:
            logger.info("%s received; %s (once more to quit at once)",
                        signal.Signals(signum).name, stopping)
            threading.Thread(target=first, name="shutdown").start()
        elif len(signalled) == 2:
            logger.info("%s received again; quitting now", signal.Signals(signum).name)
            threading.Thread(target=second, name="quit").start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return signalled
