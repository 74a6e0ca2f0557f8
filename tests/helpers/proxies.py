"""TCP proxies on 127.0.0.1 in front of a relay, to make a path go silent.

- ``FreezableProxy``: ``freeze()`` stops the pumps reading (the kernel's
  buffers fill, nothing more moves), ``cut()`` resets the connections;
- ``Proxy``: records every byte each way; ``freeze()`` keeps reading and
  discards what comes, and holds new connections until ``thaw()``.
"""

import socket
import struct
import threading

from helpers.basics import LOOPBACK, TIMEOUT


class _ProxiedConnection(object):
    """One connection through ``FreezableProxy``: a pump thread each way."""

    def __init__(self, downstream, upstream):
        self.socks = (downstream, upstream)
        for sock in self.socks:
            sock.settimeout(None)
        self.frozen = False
        self.stopping = False
        self._threads = [threading.Thread(target=self._pump, args=(downstream, upstream),
                                          name="test proxy up"),
                         threading.Thread(target=self._pump, args=(upstream, downstream),
                                          name="test proxy down")]
        for thread in self._threads:
            thread.daemon = True

    def start(self):
        for thread in self._threads:
            thread.start()

    def _pump(self, src, dst):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if self.frozen or self.stopping:
                return   # forward nothing more; the sockets stay as they are
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)   # pass the FIN on
                except OSError:
                    pass
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self, reset=False):
        self.stopping = True
        for sock in self.socks:
            try:
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RD if reset else socket.SHUT_RDWR)   # wakes recv
            except OSError:
                pass
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(TIMEOUT)
                assert not thread.is_alive(), "test proxy pump still running"
        for sock in self.socks:
            sock.close()   # with SO_LINGER 0: a TCP reset


class FreezableProxy(object):
    """A TCP proxy on 127.0.0.1 in front of ``target``, to make a path go silent.

    ``freeze()``: the connections open now stop forwarding both ways, and
    their sockets stay open: no FIN, no RST, as when the machine at the other
    end vanishes. ``cut()``: they end with a TCP reset both ways (a lost
    connection, no goodbye). New connections pass normally either way.
    """

    def __init__(self, target):
        self.target = tuple(target[:2])
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(16)
        self.address = self._listener.getsockname()
        self._lock = threading.Lock()
        self._connections = []
        self._closing = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="test proxy")
        self._acceptor.daemon = True
        self._acceptor.start()

    def _accept_loop(self):
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=TIMEOUT)
            except OSError:
                downstream.close()
                continue
            connection = _ProxiedConnection(downstream, upstream)
            with self._lock:
                closing = self._closing
                if not closing:
                    self._connections.append(connection)
            if closing:
                connection.close()
                return
            connection.start()

    def _take(self):
        with self._lock:
            connections, self._connections = self._connections, []
        return connections

    def freeze(self):
        with self._lock:
            for connection in self._connections:
                connection.frozen = True

    def cut(self):
        for connection in self._take():
            connection.close(reset=True)

    def close(self):
        with self._lock:
            self._closing = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)   # wakes accept()
        except OSError:
            pass
        self._acceptor.join(TIMEOUT)
        assert not self._acceptor.is_alive(), "test proxy acceptor still running"
        self._listener.close()
        for connection in self._take():
            connection.close()


class _Piped(object):
    """One connection through ``Proxy``."""

    def __init__(self, proxy, down):
        self.proxy = proxy
        self.down = down
        self.up = None
        self.upstream = bytearray()     # client -> target
        self.downstream = bytearray()   # target -> client
        self.frozen = False
        self._threads = []
        self._main = threading.Thread(target=self._run, name="test proxy")
        self._main.daemon = True

    def start(self):
        self._main.start()

    def _run(self):
        if not self.proxy._wait_open():
            return
        try:
            self.up = socket.create_connection(self.proxy.target, timeout=TIMEOUT)
        except OSError:
            return
        self.up.settimeout(None)
        self.down.settimeout(None)
        other = threading.Thread(target=self._pump, args=(self.up, self.down, self.downstream),
                                 name="test proxy down")
        other.daemon = True
        self._threads.append(other)
        other.start()
        self._pump(self.down, self.up, self.upstream)

    def _pump(self, src, dst, record):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                if not self.frozen:
                    try:
                        dst.shutdown(socket.SHUT_WR)   # pass the FIN on
                    except OSError:
                        pass
                return
            if self.frozen:
                continue   # a silent path: bytes vanish, nothing comes back
            with self.proxy._lock:
                record += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def join(self, timeout=TIMEOUT):
        for thread in [self._main] + self._threads:
            if thread.ident is not None:
                thread.join(timeout)
                assert not thread.is_alive(), "test proxy pump still running"

    def close(self):
        for sock in (self.down, self.up):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.join()
        for sock in (self.down, self.up):
            if sock is not None:
                sock.close()


class Proxy(object):
    """A TCP proxy on 127.0.0.1 in front of ``target`` that records every byte each
    way (``connections[i].upstream`` / ``.downstream``).

    ``freeze()``: the connections open now go silent both ways (no bytes, no FIN,
    no RST: a path that died with both ends up), and new connections are held,
    unconnected, until ``thaw()``.
    """

    def __init__(self, target):
        self.target = tuple(target[:2])
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(64)
        self.address = self._listener.getsockname()
        self.port = self.address[1]
        self._lock = threading.Lock()
        self._state = threading.Condition(self._lock)
        self._frozen = False
        self._closing = False
        self.connections = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="test proxy accept")
        self._acceptor.daemon = True
        self._acceptor.start()

    def _accept_loop(self):
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            piped = _Piped(self, down)
            with self._lock:
                if self._closing:
                    down.close()
                    return
                self.connections.append(piped)
            piped.start()

    def _wait_open(self):
        with self._lock:
            while self._frozen and not self._closing:
                self._state.wait()
            return not self._closing

    def freeze(self):
        with self._lock:
            self._frozen = True
            for piped in self.connections:
                piped.frozen = True

    def thaw(self):
        with self._lock:
            self._frozen = False
            self._state.notify_all()

    def close(self):
        with self._lock:
            self._closing = True
            self._state.notify_all()
            connections = list(self.connections)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)   # wakes accept()
        except OSError:
            pass
        self._acceptor.join(TIMEOUT)
        assert not self._acceptor.is_alive(), "test proxy still accepting"
        self._listener.close()
        for piped in connections:
            piped.close()
