"""Shared fixtures: loopback socket pairs, muxado session pairs, leak checks."""

import json
import os
import socket
import threading

import pytest

from tcprelay import frames, muxado

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
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


@pytest.fixture
def no_leaks():
    """Fails the test if it leaves threads running or files open."""
    check = LeakCheck()
    yield check
    check.assert_clean()


class SessionPair(object):
    """A client and a server muxado session over loopback TCP."""

    def __init__(self, client_options=None, server_options=None):
        dialer, acceptor = tcp_pair()
        self.client = muxado.client(dialer, **(client_options or {}))
        self.server = muxado.server(acceptor, **(server_options or {}))

    def stream_pair(self):
        """(client side, server side) of a new client-opened stream."""
        opened = self.client.open()
        accepted = self.server.accept(timeout=TIMEOUT)
        opened.settimeout(TIMEOUT)
        accepted.settimeout(TIMEOUT)
        return opened, accepted

    def close(self):
        self.client.close()
        self.server.close()
        assert self.client.wait(TIMEOUT) and self.server.wait(TIMEOUT)


@pytest.fixture
def sessions(no_leaks):
    pair = SessionPair()
    yield pair
    pair.close()


class RawPeer(object):
    """A hand-driven peer: a plain socket on one end, a Python session on the other.

    ``session`` is ours (a server unless ``client=True`` is given); the test
    writes raw bytes with ``send`` and reads back decoded frames.
    """

    def __init__(self, client=False, **options):
        dialer, acceptor = tcp_pair()
        if client:
            # Our session dialed; the raw socket is the accepting side.
            self.sock = acceptor
            self.session = muxado.client(dialer, **options)
        else:
            self.sock = dialer
            self.session = muxado.server(acceptor, **options)
        self._decoder_frames = []
        self._collector = frames._FrameCollector()
        self._decoder = frames.FrameDecoder(self._collector, keep_unknown_bodies=True)
        self.eof = False

    def send(self, data):
        self.sock.sendall(data)

    def read_frame(self, timeout=TIMEOUT):
        """The next frame from our session, or None at EOF."""
        self.sock.settimeout(timeout)
        while not self._collector.frames:
            if self.eof:
                return None
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
                continue
            self._decoder.feed(data)
        return self._collector.frames.pop(0)

    def read_until_eof(self, timeout=TIMEOUT):
        """Every frame until our session closes the connection."""
        out = []
        while True:
            frame = self.read_frame(timeout)
            if frame is None:
                return out
            out.append(frame)

    def close(self):
        self.session.close()
        self.sock.close()
        assert self.session.wait(TIMEOUT)


@pytest.fixture
def raw_peer(no_leaks):
    peers = []

    def make(**options):
        peer = RawPeer(**options)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()
