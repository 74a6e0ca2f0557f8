"""Child processes for the tests: ``Process``, a ``python -m tcprelay...`` child
whose first stdout line can be read with a timeout and whose stderr goes to a
file (no pipe to fill up); ``Starter``, which starts relays and services and
closes them all; and ``MainRun``, a program's ``main(argv)`` run in this
process, for the argument errors (a child costs 0.1-0.3 s to start)."""

import importlib
import io
import logging
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time

from helpers.basics import LOOPBACK, ROOT, TIMEOUT, Worker, wait_until
from helpers.relay import listeners
from tcprelay import auth


class Process(object):
    """``python -m module args...`` from the repository root.

    stdout is a pipe read with timeouts (``readline``); stderr goes to a
    temporary file (``stderr_text``), so a chatty child can never block.
    """

    def __init__(self, module, args, open_files=None, command=None):
        """``open_files``: (soft, hard) RLIMIT_NOFILE for the child; ``command``:
        the argv before ``args`` instead of ``python -m module`` (a zipapp, say)."""
        command = [sys.executable, "-m", module] if command is None else list(command)
        self.argv = command + [str(a) for a in args]
        self._stderr = tempfile.TemporaryFile()
        self._out = bytearray()
        preexec = None
        if open_files is not None:
            import resource

            def preexec():
                resource.setrlimit(resource.RLIMIT_NOFILE, open_files)
        self.popen = subprocess.Popen(self.argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=self._stderr,
                                      preexec_fn=preexec)
        self.pid = self.popen.pid

    def __repr__(self):
        return "<Process %d %s>" % (self.pid, " ".join(self.argv[2:]))

    def readline(self, timeout=TIMEOUT):
        """The next stdout line (no newline), which must come within ``timeout``."""
        deadline = time.monotonic() + timeout
        fd = self.popen.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._out:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("%r wrote no line on stdout within %gs; stderr:\n%s"
                                         % (self, timeout, self.stderr_text()))
                if selector.select(left):
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        raise AssertionError("%r closed stdout (exit %r) before a line; "
                                             "stdout %r; stderr:\n%s"
                                             % (self, self.popen.poll(), bytes(self._out),
                                                self.stderr_text()))
                    self._out += chunk
        line, _, rest = bytes(self._out).partition(b"\n")
        self._out = bytearray(rest)
        return line.decode("utf-8")

    def stdout_rest(self):
        """What is left on stdout; only once the process has exited."""
        assert self.popen.poll() is not None
        fd = self.popen.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._out += chunk
        rest, self._out = bytes(self._out), bytearray()
        return rest.decode("utf-8", "replace")

    def stderr_text(self):
        self._stderr.flush()
        with open("/proc/self/fd/%d" % self._stderr.fileno(), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stderr_lines(self):
        return [line for line in self.stderr_text().splitlines() if line.strip()]

    def alive(self):
        return self.popen.poll() is None

    def wait(self, timeout=TIMEOUT):
        """The exit code, which must come within ``timeout``."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("%r still running after %gs; stderr:\n%s"
                                 % (self, timeout, self.stderr_text()))

    def send_signal(self, signum):
        self.popen.send_signal(signum)

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(TIMEOUT)

    def close(self):
        try:
            self.kill()
        finally:
            self.popen.stdout.close()
            self._stderr.close()

    # -- /proc ------------------------------------------------------------------------

    def threads(self):
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
        raise AssertionError("no Threads line in /proc/%d/status" % self.pid)

    def open_files(self):
        return len(os.listdir("/proc/%d/fd" % self.pid))


class Starter(object):
    """Starts ``python -m`` processes (``Process``) and closes them all (``close``).

    ``check_listeners``: ``relay()`` also asserts that 127.0.0.1 is the one
    listener on the relay's port (False where a test starts a relay on a port
    another relay may still hold, or never asked for it).
    """

    def __init__(self, check_listeners=True):
        self.check_listeners = check_listeners
        self._started = []

    def start(self, module, *args, **kw):
        """A started ``python -m module args...``. ``secret_env``: $TCPRELAY_SECRET
        for this child only; ``open_files``: its (soft, hard) RLIMIT_NOFILE."""
        secret_env = kw.pop("secret_env", None)
        if secret_env is not None:
            os.environ[auth.SECRET_ENV] = secret_env
        try:
            process = Process(module, args, **kw)
        finally:
            if secret_env is not None:
                os.environ.pop(auth.SECRET_ENV, None)
        self._started.append(process)
        return process

    def relay(self, port, *args, **kw):
        """A relay on 127.0.0.1:``port``, whose log says ``ready`` (by default that
        it is listening) when this returns; other keywords go to ``start``."""
        ready = kw.pop("ready", "listening for services")
        relay = self.start("tcprelay.relay", port, "--host", LOOPBACK,
                           "--public-bind", LOOPBACK, *args, **kw)
        wait_until(lambda: not relay.alive() or ready in relay.stderr_text(),
                   what="the relay to start")
        assert relay.alive(), "relay exited with %r:\n%s" % (relay.popen.poll(),
                                                              relay.stderr_text())
        if self.check_listeners:
            assert listeners(port) == [LOOPBACK]
        return relay

    def service(self, module, relay_port, *args, **kw):
        """A service program registered with the relay: (process, public port)."""
        process = self.start(module, kw.pop("host", LOOPBACK), relay_port, *args, **kw)
        line = process.readline()
        match = re.match(r"^127\.0\.0\.1:(\d+)$", line)
        assert match, "first line %r" % line
        return process, int(match.group(1))

    def echo(self, relay_port, *args, **kw):
        """An echo server registered with the relay: (process, public port)."""
        return self.service("tcprelay.echoserver", relay_port, *args, **kw)

    def close(self):
        """Kills and closes every process started, newest first."""
        for process in reversed(self._started):
            process.close()


def quick(*args):
    """The relay options the tests use unless they test them: short timeouts."""
    return ["--handshake-timeout", "1", "--drain-timeout", "2"] + list(args)


def assert_no_traceback(process):
    assert "Traceback" not in process.stderr_text(), process.stderr_text()


def assert_clean_exit(process, code, prefix):
    """Exit ``code`` and a last stderr line starting with ``prefix``; no traceback."""
    assert process.wait() == code, process.stderr_text()
    text = process.stderr_text()
    assert "Traceback" not in text, text
    lines = [l for l in text.splitlines() if l.strip()]
    assert lines and lines[-1].startswith(prefix), lines
    return lines[-1]


class MainRun(object):
    """``module.main(argv)`` run in this process and finished, read like a
    finished ``Process`` (``wait``, ``stdout_rest``, ``stderr_text``,
    ``stderr_lines``): for argument errors, which end main() before it binds
    or starts anything. The same code as ``python -m module args...`` but for
    the ``sys.exit(main())`` line, which the tests that start a child cover.

    main() runs in a thread with sys.stdout and sys.stderr replaced, within
    TIMEOUT: a main that got past its checks fails there (signal.signal takes
    only the main thread) instead of serving. An exception other than
    SystemExit is raised here, as a child's traceback would be a failure.
    """

    def __init__(self, module, args):
        self.argv = [str(a) for a in args]
        main = importlib.import_module(module).main
        out, err = io.StringIO(), io.StringIO()

        def run():
            saved = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = out, err
            try:
                return main(self.argv)
            except SystemExit as exc:
                return exc.code
            finally:
                sys.stdout, sys.stderr = saved

        # main() may configure logging (a no-op under pytest, whose handlers the
        # root logger has; restored all the same).
        handlers, level = list(logging.root.handlers), logging.root.level
        try:
            code = Worker(run, name="in-process main").finish()
        finally:
            logging.root.handlers[:] = handlers
            logging.root.setLevel(level)
        if code is not None and not isinstance(code, int):   # sys.exit("text"): as Python does
            err.write("%s\n" % code)
            code = 1
        self.code = 0 if code is None else code
        self._out, self._err = out.getvalue(), err.getvalue()

    def __repr__(self):
        return "<MainRun %s>" % " ".join(self.argv)

    def wait(self, timeout=None):
        """The exit code (SystemExit's, or what main() returned)."""
        return self.code

    def stdout_rest(self):
        return self._out

    def stderr_text(self):
        return self._err

    def stderr_lines(self):
        return [line for line in self._err.splitlines() if line.strip()]
