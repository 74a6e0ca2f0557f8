"""Muxado sessions over loopback TCP for the tests: a client/server pair, and a
raw peer (a plain socket the test writes frames on) against one of ours."""

from helpers.basics import TIMEOUT, tcp_pair
from tcprelay import frames, muxado


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


def pattern(n, seed=0):
    """``n`` bytes with a prime period (251): a byte lost, repeated or moved by any
    power-of-two amount (frames, windows, buffers) shows up as a mismatch."""
    block = bytes((i * 7 + seed) & 0xFF for i in range(251))
    return (block * (n // 251 + 1))[:n]


def raw_open(peer, stream_id, payload=b"", fin=False):
    """The raw peer opens ``stream_id`` (DATA+SYN); returns the accepted stream."""
    flags = frames.SYN | (frames.FIN if fin else 0)
    peer.send(frames.encode_data(stream_id, payload, flags))
    stream = peer.session.accept(timeout=TIMEOUT)
    stream.settimeout(TIMEOUT)
    assert stream.id == stream_id
    return stream


def frames_until(peer, stop):
    """Frames read by the raw peer up to and including the first for which ``stop`` is true."""
    out = []
    while True:
        frame = peer.read_frame(TIMEOUT)
        assert frame is not None, "EOF before the expected frame; got %r" % (out,)
        out.append(frame)
        if stop(frame):
            return out
