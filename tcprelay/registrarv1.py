"""The relay's side of the 2014 registration, for muxado v1 services.

A service built on Go muxado v1 (the 2014 tcp-relay's ``echoserver.go``)
opens a stream and reads it to its end, without writing or half-closing
first: there is no request to read. So the first stream it opens (its
heartbeat stream aside, see ``muxadov1``) is taken at once as a minimal
registration; the relay then replies ``host:port`` and closes the stream
(``Registrar._announce``), without waiting for anything from the service.

A v1 service can neither authenticate nor ask for anything: a relay with a
secret drops it, and it gets what a minimal v2 registration gets.
"""

import logging
import socket
import time

from . import registration

# The relay's lines, wherever its code lives: operators and tests know them by this name.
log = logging.getLogger("tcprelay.relay")


def handshake(link, session):
    """The registration of a v1 service on ``link`` (a ``ServiceLink``), whose
    ``session`` is a v1 one: ``(request, stream)``, or ``(None, None)`` if refused."""
    relay = link.relay
    try:
        stream = session.accept(timeout=max(0.0, link._handshake_deadline - time.monotonic()))
    except socket.timeout:
        relay._log_remote("silent", "%s: opened no registration stream within %gs; "
                          "dropping it", link.label, relay.handshake_timeout)
        return None, None
    if relay.secret is not None:
        relay._log_remote("auth", "%s: a muxado v1 service cannot authenticate, and this "
                          "relay requires a secret; dropping it", link.label)
        return None, None
    log.info("%s: registering (muxado v1, the 2014 form: no request)", link.label)
    return registration.Request(minimal=True), stream
