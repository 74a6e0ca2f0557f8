"""TLS on the service port: contexts, and a transport muxado can share between threads.

A muxado session reads its socket in one thread while others write to it.
An ``ssl.SSLSocket`` must not be used that way: OpenSSL's SSL objects are
not safe for concurrent reads and writes (TLS 1.3 reads may themselves
write, for key updates and tickets). ``TLSTransport`` makes every SSL call
non-blocking and runs it under one lock, and waits for the socket with
poll() outside the lock, so a blocked reader never holds up a writer.
"""

import logging
import select
import socket
import ssl
import threading
import time

from . import clock

log = logging.getLogger(__name__)

_WAIT_EVENTS = select.POLLERR | select.POLLHUP


def _tls12_minimum(context):
    if hasattr(context, "minimum_version"):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    else:   # Python 3.6
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1


def server_context(cert_file, key_file):
    """The relay's context: its certificate and key, TLS 1.2 at least."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _tls12_minimum(context)
    context.load_cert_chain(cert_file, key_file)
    return context


def client_context(ca_file=None, insecure=False):
    """A service's context: verify the relay against ``ca_file`` (default: the
    system store) and its host name, unless ``insecure``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _tls12_minimum(context)
    if insecure:
        log.warning("TLS without verifying the relay's certificate (--tls-insecure): "
                    "anyone on the path can pretend to be the relay")
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_file:
        context.load_verify_locations(ca_file)
    else:
        context.load_default_certs()
    return context


class TLSTransport(object):
    """An established ``ssl.SSLSocket``, safe for one reader and many writers."""

    def __init__(self, sslsock):
        self._ssl = sslsock
        self._fd = sslsock.fileno()
        self._lock = threading.Lock()
        self._write_timeout = None
        sslsock.setblocking(False)

    def set_write_timeout(self, seconds):
        """Writes that make no progress for ``seconds`` raise socket.timeout."""
        self._write_timeout = seconds

    def recv_into(self, buffer, nbytes=0):
        view = memoryview(buffer)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        nbytes = nbytes or len(view)
        while True:
            got = 0
            with self._lock:
                try:
                    # One call returns one TLS record (16 KiB at most): take
                    # every record already here, under one acquisition.
                    while got < nbytes:
                        n = self._ssl.recv_into(view[got:nbytes])
                        if not n:
                            break
                        got += n
                    return got
                except ssl.SSLWantReadError:
                    events = select.POLLIN
                except ssl.SSLWantWriteError:
                    events = select.POLLOUT
                except ssl.SSLZeroReturnError:
                    return got   # the peer closed TLS cleanly
                except OSError:
                    # The records already taken are in the caller's buffer: they go
                    # first, the error again on the next call (an EOF without
                    # close_notify raises here on Python < 3.10 with OpenSSL 3).
                    if got:
                        return got
                    raise
            if got:
                return got
            self._wait(events, None)

    def sendall(self, data):
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        # The timeout bounds one wait for the socket, not the whole call: a
        # big frame on a slow link takes long and is fine while bytes move.
        # (OpenSSL keeps a record it could write only in part and says
        # "want write" again, so the socket's readiness is the progress.)
        timeout = self._write_timeout
        while view:
            with self._lock:
                try:
                    sent = self._ssl.send(view)
                    view = view[sent:]
                    continue
                except ssl.SSLWantWriteError:
                    events = select.POLLOUT
                except ssl.SSLWantReadError:
                    events = select.POLLIN
            if not self._wait(events, timeout):
                raise socket.timeout("TLS write timed out")

    def pending(self):
        with self._lock:
            return self._ssl.pending()

    def _wait(self, events, timeout):
        """Wait until the socket is ready for ``events``; False on timeout."""
        if timeout is not None and timeout <= 0:
            return False
        poller = select.poll()
        poller.register(self._fd, events | _WAIT_EVENTS)
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            if poller.poll(clock.poll_ms(None if end is None else end - time.monotonic())):
                return True
            if end is not None and time.monotonic() >= end:
                return False

    def shutdown(self, how):
        # The plain socket's shutdown: it wakes a reader in poll(), and unlike
        # SSLSocket.shutdown it leaves the SSL object alone while others use it.
        socket.socket.shutdown(self._ssl, how)

    def close(self):
        with self._lock:
            self._ssl.close()

    def fileno(self):
        return self._ssl.fileno()

    def getpeername(self):
        return self._ssl.getpeername()

    def getsockname(self):
        return self._ssl.getsockname()

    def setsockopt(self, *args):
        return self._ssl.setsockopt(*args)

    def settimeout(self, timeout):
        """Ignored: the transport is always driven non-blocking."""

    def version(self):
        return self._ssl.version()
