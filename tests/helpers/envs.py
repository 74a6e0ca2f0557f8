"""What the in-process relay tests build and tear down, newest first: ``Env``
(relays, services, clients), ``ServiceEnv`` (plus relays on a chosen port,
library connections, RelayServers, freezable proxies) and ``SecurityEnv``
(plus library connections, echo loops, recording proxies, raw services).
Their fixtures are in conftest.py."""

import socket
import threading

from helpers.basics import LOOPBACK, TIMEOUT, Worker, free_port_range
from helpers.proxies import FreezableProxy, Proxy
from helpers.relay import RawService, Service, connect_client, echo_handler, recv_exact
from tcprelay import muxado
from tcprelay.relay import Relay
from tcprelay.service import RelayServer, connect


class Env(object):
    """Builds relays, services and clients for one test and tears them down, newest first."""

    def __init__(self):
        self._cleanups = []

    def defer(self, fn, *args):
        self._cleanups.append((fn, args))

    def relay(self, ports=1, **options):
        """A started relay on 127.0.0.1 with ``ports`` free public ports (or that list)."""
        if isinstance(ports, int):
            ports = free_port_range(ports)
        options.setdefault("public_bind", LOOPBACK)
        options.setdefault("handshake_timeout", 5.0)
        # These tests follow moves in line; the repeated waiting lines of a
        # relay's waiting_interval are tested in test_waits.
        options.setdefault("waiting_interval", None)
        relay = Relay((LOOPBACK, 0), ports=ports, **options)
        thread = threading.Thread(target=relay.serve_forever, name="relay serve_forever")
        thread.start()
        self.defer(self._stop_relay, relay, thread)
        return relay

    @staticmethod
    def _stop_relay(relay, thread):
        relay.shutdown()
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "serve_forever did not return after shutdown()"
        relay.server_close()

    def service(self, relay):
        service = Service(relay.server_address)
        self.defer(service.close)
        return service

    def client(self, port):
        sock = connect_client(port)
        self.defer(sock.close)
        return sock

    def close(self):
        errors = []
        while self._cleanups:
            fn, args = self._cleanups.pop()
            try:
                fn(*args)
            except Exception as exc:   # run every cleanup, report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]


POLL = 0.1   # serve_forever's poll_interval: shutdown() is noticed within it (default 0.5 s)


class Serving(object):
    """``server.serve_forever(POLL, reconnect)`` on a thread of its own."""

    def __init__(self, server, reconnect):
        self.server = server
        self.worker = Worker(server.serve_forever, POLL, reconnect, name="serve_forever")
        self.checked = False

    def result(self, timeout=TIMEOUT):
        """What serve_forever returned (or raises what it raised), once it has ended."""
        self.checked = True
        return self.worker.finish(timeout)

    def stop(self):
        # server_close() leaves the relay, which ends serve_forever as well.
        # (Not shutdown() here: it can hang, see test_shutdown_returns_promptly.)
        self.server.server_close()
        self.worker.join(TIMEOUT)
        assert not self.worker.is_alive(), "serve_forever did not return after server_close()"
        if not self.checked:
            self.worker.finish()   # an unexpected exception fails the test


class ServiceEnv(Env):
    """Env, plus relays on a chosen port, servers, proxies.

    Unlike Env's, its relays keep the default waiting_interval (test_waits
    relies on the repeated waiting line) and stop last."""

    def __init__(self):
        Env.__init__(self)
        self._relay_threads = {}

    def relay(self, ports=1, port=0, **options):
        """A started relay on 127.0.0.1:``port`` (0: any) with ``ports`` (a count or a list)."""
        if isinstance(ports, int):
            ports = free_port_range(ports)
        options.setdefault("public_bind", LOOPBACK)
        options.setdefault("handshake_timeout", 5.0)
        relay = Relay((LOOPBACK, port), ports=ports, **options)
        thread = threading.Thread(target=relay.serve_forever, name="relay serve_forever")
        thread.start()
        self._relay_threads[relay] = thread
        # Relays stop last, after the services and clients made after them.
        self._cleanups.insert(0, (self._stop_relay, (relay, thread)))
        return relay

    def stop_relay(self, relay):
        """Stop a relay now: every service's session ends."""
        self._stop_relay(relay, self._relay_threads[relay])

    def connect(self, address, **options):
        options.setdefault("timeout", TIMEOUT)
        connection = connect(address, **options)
        self.defer(connection.close)
        return connection

    def server(self, address, handler, cls=None, **options):
        server = (cls or RelayServer)(address, handler, **options)
        self.defer(server.server_close)
        return server

    def serve(self, server, reconnect=False):
        serving = Serving(server, reconnect)
        self.defer(serving.stop)
        return serving

    def proxy(self, target):
        proxy = FreezableProxy(target)
        self.defer(proxy.close)
        return proxy

    def assert_reaches(self, port, service, data):
        """A client of public ``port`` gets ``data`` through to ``service``."""
        client = self.client(port)
        stream = service.accept(TIMEOUT)
        stream.settimeout(TIMEOUT)
        client.sendall(data)
        assert recv_exact(stream, len(data)) == data
        stream.close()

    def listener(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.defer(sock.close)
        sock.bind((LOOPBACK, 0))
        sock.listen(8)
        sock.settimeout(TIMEOUT)
        return sock


class EchoLoop(object):
    """Serves a ``ServiceConnection``: every stream is echoed, on a thread each."""

    def __init__(self, connection):
        self.connection = connection
        self._threads = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._run, name="test echo loop")
        self._acceptor.daemon = True
        self._acceptor.start()

    def _run(self):
        while True:
            try:
                stream = self.connection.accept()
            except (OSError, muxado.MuxadoError):
                return
            stream.settimeout(TIMEOUT)
            thread = threading.Thread(target=echo_handler, args=(stream,), name="test echo")
            thread.daemon = True
            with self._lock:
                self._threads.append(thread)
            thread.start()

    def close(self):
        self.connection.close()
        self._acceptor.join(TIMEOUT)
        assert not self._acceptor.is_alive(), "echo loop still accepting"
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "echo handler still running"


class SecurityEnv(Env):
    """Env plus library connections, echo loops and proxies; ``connect`` takes
    the (host, port) of any longer address."""

    def connect(self, address, **options):
        options.setdefault("timeout", TIMEOUT)
        connection = connect(tuple(address[:2]), **options)
        self.defer(connection.close)
        return connection

    def echo(self, connection):
        loop = EchoLoop(connection)
        self.defer(loop.close)
        return loop

    def proxy(self, target):
        proxy = Proxy(target)
        self.defer(proxy.close)
        return proxy

    def raw(self, address):
        raw = RawService(address)
        self.defer(raw.close)
        return raw


def registered(env, ports=1, **relay_options):
    """(relay, service, public port): one service registered on a fresh relay."""
    relay = env.relay(ports=ports, **relay_options)
    service = env.service(relay)
    port = service.register_ok()
    return relay, service, port
