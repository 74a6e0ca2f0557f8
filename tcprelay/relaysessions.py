"""A ``RelayServer`` registered with several relays (docs/DEPLOY.md, "Several
relays"): one ``RelaySession`` per relay, each with its own connection, lease
and accept loop thread; the clients of all of them go to the one server's
handlers (``_handle``, ``process_request``, its threads and worker pool).

The server owns the sessions: ``serve_all`` starts their loop threads and
joins them before it returns; ``shutdown()`` and ``server_close()`` reach
every session (service.RelayServer).
"""

import logging
import threading

from . import muxado, registration
from .registrant import RegistrationRefused
from .relaydial import RelayGone
from .service import RelayServer

log = logging.getLogger(__name__)


class RelaySession(RelayServer):
    """``owner``'s registration with one relay: it registers there and
    reconnects on its own, with its own lease; each client's stream goes to
    ``owner``. ``error``: why its loop ended, if not by a shutdown."""

    def __init__(self, owner, relay_address, registered_lock):
        self.owner = owner
        self.error = None
        self._registered_lock = registered_lock   # the owner's registered() runs one at a time
        tunnel_options = dict((name, dict(options)) for name, options
                              in owner.tunnel_options.items())
        RelayServer.__init__(
            self, relay_address, owner.RequestHandlerClass, port=owner.requested_port,
            name=owner.name, timeout=owner.connect_timeout, bind_and_activate=False,
            retry=owner.retry, proxy_protocol=owner.proxy_protocol, heartbeat=owner.heartbeat,
            minimal=owner.minimal, tunnel_options=tunnel_options, **owner.connect_options)

    def _handle(self, stream):
        self.owner._handle(stream)

    def registered(self, previous_address, connection):
        owner = self.owner
        with self._registered_lock:
            if self is owner.relay_sessions[0]:
                owner.public_address = self.public_address
                owner.server_address = self.server_address
                owner.public_addresses = self.public_addresses
            owner.registered(previous_address, connection)

    def run(self, poll_interval, reconnect):
        """Its loop thread: register if it has not yet, then serve until shut down."""
        try:
            if self.connection is None:
                try:
                    self._register(retry=True)
                except RelayGone:
                    return   # shut down while registering
            self.serve_forever(poll_interval, reconnect)
        except Exception as exc:   # RelayGone without reconnect, a refusal, a handler's
            self.error = exc
            log.warning("no more clients through the relay at %s: %s", self.relay_label, exc)


def sessions_for(server):
    """One RelaySession for each of ``server.relay_addresses``, in order."""
    lock = threading.Lock()
    return [RelaySession(server, address, lock) for address in server.relay_addresses]


def register_all(server):
    """Register ``server`` with every relay: the first, then the others, asked
    for the first's port unless ``port`` was given. With ``retry``, a relay
    after the first that cannot be reached is left to its loop thread. Raises
    as ``RelayServer.server_activate`` does, every connection made closed."""
    sessions = server.relay_sessions
    first, others = sessions[0], sessions[1:]
    try:
        first._register(retry=server.retry)
        _same_ports(first, others)
        for session in others:
            try:
                session._register(retry=False)
            except RegistrationRefused:
                raise
            except (OSError, registration.RegistrationError, muxado.MuxadoError) as exc:
                if not server.retry or server.shutdown_requested:
                    raise
                log.warning("cannot register with the relay at %s yet (%s): serving through "
                            "the others, and trying it again", session.relay_label,
                            getattr(exc, "strerror", None) or exc)
    except BaseException:
        for session in sessions:
            session.server_close()
        raise


def _same_ports(first, others):
    """Ask ``others`` for the public ports ``first`` got, where none was asked for:
    one port number for a load balancer in front of them all."""
    connection = first.connection
    if connection.minimal:
        return   # the minimal form cannot ask for a port
    for session in others:
        if connection.tunnels is None:
            if session.requested_port is None:
                session.requested_port = connection.port
            continue
        for tunnel in connection.tunnels.values():
            session.tunnel_options.setdefault(tunnel.name, {}).setdefault("port", tunnel.port)


def serve_all(server, poll_interval, reconnect):
    """``server.serve_forever`` with several relays: each session's loop on a
    thread of its own, until ``shutdown()``; without ``reconnect``, until
    every relay is gone too (then RelayGone, or the first session's error).
    ``serve_forever`` resets the server's own state around it."""
    sessions = server.relay_sessions
    threads = []
    try:
        for session in sessions:
            thread = threading.Thread(target=session.run, args=(poll_interval, reconnect),
                                      name="relay session %s" % session.relay_label)
            thread.start()
            threads.append(thread)
        while not server._shutdown_requested.wait(poll_interval):
            server.service_actions()
            if not any(thread.is_alive() for thread in threads):
                break
        stopped = server._shutdown_requested.is_set()
    finally:
        for session in sessions:
            session._stop_registering()
        for thread in threads:
            thread.join()
        for session in sessions:
            session._shutdown_requested.clear()   # serve_forever can run again
    if stopped:
        return None
    errors = [session.error for session in sessions if session.error is not None]
    refused = [exc for exc in errors if isinstance(exc, RegistrationRefused)]
    raise (refused or errors or [RelayGone("every relay is gone")])[0]
