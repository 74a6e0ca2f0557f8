"""The basic life of sessions and streams over loopback TCP."""

import threading

from helpers.basics import TIMEOUT


def test_open_write_halfclose_reply(sessions):
    opened, accepted = sessions.stream_pair()
    opened.sendall(b"hello")
    opened.close_write()
    assert accepted.recv(100) == b"hello"
    assert accepted.recv(100) == b""
    accepted.sendall(b"world")
    accepted.close()
    assert opened.recv(100) == b"world"
    assert opened.recv(100) == b""
    opened.close()


def test_large_transfer_crosses_many_windows(sessions):
    opened, accepted = sessions.stream_pair()
    data = bytes(range(256)) * 4096 * 4   # 4 MiB, 16 windows
    writer = threading.Thread(target=lambda: (opened.sendall(data), opened.close_write()))
    writer.start()
    received = bytearray()
    while True:
        chunk = accepted.recv(1 << 20)
        if not chunk:
            break
        received += chunk
    writer.join(TIMEOUT)
    assert not writer.is_alive()
    assert received == data


def test_server_opens_stream(sessions):
    opened = sessions.server.open()
    opened.sendall(b"ping")
    accepted = sessions.client.accept(timeout=TIMEOUT)
    accepted.settimeout(TIMEOUT)
    assert accepted.id == opened.id == 2
    assert accepted.recv(4) == b"ping"
    accepted.sendall(b"pong")
    assert opened.recv(4) == b"pong"


def test_close_ends_threads_and_socket(no_leaks):
    from helpers.sessions import SessionPair
    pair = SessionPair()
    opened, accepted = pair.stream_pair()
    pair.client.close()
    assert pair.server.wait(TIMEOUT)
    assert pair.client.closed and pair.server.closed
    pair.server.close()
