"""The basics every test shares, standard library only (tests/fuzzing.py may use
them when run from scripts/fuzz.py): the timeout bound, where things are, a
worker thread that re-raises, polling with a deadline, free ports, loopback
socket pairs, leak checks and a clock the test moves.

Free public port ranges: ports below 32768 are never handed out by the kernel
here, so a random range in 20000-32000 that binds is ours to use.
``wait_until`` is for state that can only be seen by polling (another
process's /proc, its log file), always with a deadline.
"""

import json
import os
import random
import socket
import threading
import time

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(TESTS_DIR, "data")
ROOT = os.path.dirname(TESTS_DIR)
LOOPBACK = "127.0.0.1"
MIB = 1 << 20
RESET_ERRORS = (ConnectionResetError, BrokenPipeError)
TIMEOUT = 10.0   # the bound on any single blocking call in a test


def load_vectors():
    with open(os.path.join(DATA_DIR, "muxado-vectors.json"), encoding="utf-8") as f:
        return json.load(f)


def tcp_pair():
    """(dialer, acceptor): a connected TCP pair on 127.0.0.1, ephemeral port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(TIMEOUT)
        dialer = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        acceptor, _ = listener.accept()
    finally:
        listener.close()
    dialer.settimeout(TIMEOUT)
    acceptor.settimeout(TIMEOUT)
    return dialer, acceptor


class Worker(threading.Thread):
    """Runs ``fn(*args)`` in a thread; ``finish()`` joins it and returns or re-raises."""

    def __init__(self, fn, *args, **kwargs):
        super(Worker, self).__init__(name=kwargs.pop("name", "test-worker"))
        self.daemon = True
        self.fn = fn
        self.args = args
        self.result = None
        self.error = None
        self.start()

    def run(self):
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:   # handed to finish()
            self.error = exc

    def finish(self, timeout=TIMEOUT):
        self.join(timeout)
        assert not self.is_alive(), "worker %r still running after %gs" % (self.fn, timeout)
        if self.error is not None:
            raise self.error
        return self.result


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def fd_targets():
    """{fd: what it refers to}, to name a leaked descriptor."""
    targets = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            targets[int(name)] = os.readlink("/proc/self/fd/" + name)
        except OSError:
            pass
    return targets


class LeakCheck(object):
    """Threads and file descriptors at the start, to compare at the end."""

    def __init__(self):
        self.threads = set(threading.enumerate())
        self.fds = open_fds()
        self._targets = fd_targets()

    def new_threads(self):
        return [t for t in threading.enumerate() if t not in self.threads]

    def assert_clean(self, timeout=TIMEOUT):
        for thread in self.new_threads():
            thread.join(timeout)
        alive = [t.name for t in self.new_threads() if t.is_alive()]
        assert not alive, "threads left running: %s" % alive
        if open_fds() != self.fds:
            now = fd_targets()
            new = sorted("%d -> %s" % (fd, t) for fd, t in now.items()
                         if self._targets.get(fd) != t)
            raise AssertionError("open files: %d before, %d after; new: %s"
                                 % (self.fds, open_fds(), ", ".join(new)))


# -- ports and polling -------------------------------------------------------------------

def port_is_free(port):
    """True if nothing holds ``port`` on 127.0.0.1 (not even a TIME_WAIT connection)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, port))
    except OSError:
        return False
    finally:
        sock.close()
    return True


def free_port_range(count, low=20000, high=32000, attempts=500):
    """``count`` contiguous free ports in [low, high), picked at random."""
    rng = random.SystemRandom()
    for _ in range(attempts):
        start = rng.randrange(low, high - count)
        ports = list(range(start, start + count))
        if all(port_is_free(port) for port in ports):
            return ports
    raise RuntimeError("no %d free contiguous ports in %d-%d" % (count, low, high))


def pool_args(ports):
    """The --ports option for ``ports`` (a contiguous list)."""
    return ["--ports", "%d-%d" % (ports[0], ports[-1])]


def bindable(address):
    """Whether a listener could bind ``address`` now (a draining relay's is closed)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def wait_until(predicate, timeout=TIMEOUT, interval=0.02, what=None):
    """Poll ``predicate`` until it is true (returns its value) or fail after ``timeout``.

    Only for state nothing can be joined on: another process's /proc entries
    or log file, the kernel's socket table.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %gs waiting for %s"
                                 % (timeout, what or getattr(predicate, "__name__", predicate)))
        time.sleep(interval)


class FakeClock(object):
    """A monotonic clock the test moves by hand; it counts how often it was read."""

    def __init__(self):
        self.now = 1000.0
        self.calls = 0
        self._cond = threading.Condition()

    def __call__(self):
        with self._cond:
            self.calls += 1
            self._cond.notify_all()
            return self.now

    def advance(self, seconds):
        with self._cond:
            self.now += seconds

    def wait_calls(self, count, timeout=TIMEOUT):
        """Wait until the clock has been read ``count`` times in all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.calls < count:
                left = deadline - time.monotonic()
                assert left > 0, "the clock was read %d times, not %d" % (self.calls, count)
                self._cond.wait(left)


def ipv6_problem():
    """Why this machine cannot run the IPv6 tests, or None."""
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        probe.bind(("::1", 0))
    except OSError as exc:
        return "no IPv6 loopback (binding ::1: %s)" % exc
    finally:
        probe.close()
    return None


IPV6_PROBLEM = ipv6_problem()   # for a skip marker; None on this machine if it can
