"""Running out of file descriptors without falling over.

Every public client costs the relay one descriptor, every service about
four. When the process (EMFILE) or the system (ENFILE) has none left, or the
kernel is short of buffers (ENOBUFS, ENOMEM), ``accept()`` fails while the
listener is perfectly healthy: the connection stays in the kernel's backlog.
``accept`` here logs that (at most once a second), waits briefly so as not to
spin, and tries again, so that one exhausted moment harms nobody already
connected. nginx and HAProxy behave the same way.
"""

import errno
import logging
import sys

from . import limits

log = logging.getLogger(__name__)

EXHAUSTION = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
FIRST_BACKOFF = 0.05    # seconds; doubled up to MAX_BACKOFF while still exhausted
MAX_BACKOFF = 1.0
FDS_PER_SERVICE = 4     # its connection, the session's wake-up pair, its public listener
FDS_RESERVED = 64       # the relay's own: listeners, logs, flusher, imports



def is_exhaustion(exc):
    """True if ``exc`` (an OSError) means descriptors or buffers ran out."""
    return getattr(exc, "errno", None) in EXHAUSTION


class Acceptor(object):
    """``accept()`` on one listener, riding out descriptor exhaustion.

    ``stopping`` is a ``threading.Event``: once set, a wait between tries
    ends and the exhaustion error is raised. ``what`` names the listener in
    the log, which says so at most once a second per listener.
    """

    def __init__(self, listener, stopping, what):
        self.listener = listener
        self._stopping = stopping
        self._what = what
        self._log = limits.LogGate(log)

    def accept(self):
        """``(sock, address)``; raises OSError for anything but exhaustion
        (such as the listener being shut down) at once."""
        delay = FIRST_BACKOFF
        while True:
            try:
                return self.listener.accept()
            except OSError as exc:
                if not is_exhaustion(exc):
                    raise
                self._log("%s: cannot accept a connection: %s; retrying in %gs (open "
                          "connections are unaffected; raise the limit with `ulimit -n` or "
                          "lower --max-clients)", self._what, exc.strerror or exc, delay)
                if self._stopping.wait(delay):
                    raise
                delay = min(delay * 2, MAX_BACKOFF)


def preload_thread_exit():
    """Load libgcc_s now, while descriptors are plenty (Linux).

    glibc loads it the first time a thread ends through ``pthread_exit``, as
    CPython 3.6 ends its threads; a process out of descriptors then cannot
    open it and aborts ("libgcc_s.so.1 must be installed for pthread_exit to
    work"). Loaded once, it stays.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL("libgcc_s.so.1")
    except (ImportError, OSError):
        pass   # not glibc, or no such library: nothing to preload


def raise_open_file_limit():
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now.

    Returns None where the platform has no such limit (no ``resource`` module).
    """
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        target = 1 << 20   # Linux's default nr_open; setting "infinity" fails
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.debug("cannot raise the open file limit from %d to %d: %s", soft, target, exc)
    return soft


def descriptors_needed(max_services, max_clients, max_waiting):
    """Descriptors the relay may need at its configured limits (an estimate)."""
    per_service = FDS_PER_SERVICE + (max_clients or 0)
    return FDS_RESERVED + max_services * per_service + (max_waiting or 0) * FDS_PER_SERVICE


def prepare_descriptors(max_services, max_clients, max_waiting):
    """At the relay's start: raise the soft open-file limit to the hard one, load
    what a thread's exit needs, and warn if the limit cannot fit the options."""
    preload_thread_exit()
    limit = raise_open_file_limit()
    need = descriptors_needed(max_services, max_clients, max_waiting)
    if limit is not None and limit < need:
        # A warning if one busy service can reach the limit; else worth knowing only.
        one_service = descriptors_needed(1, max_clients, max_waiting)
        log.log(logging.WARNING if limit < one_service else logging.INFO,
                "the open file limit is %d, but --max-services %d with --max-clients %d "
                "may need about %d; past the limit new connections wait until others "
                "close. Raise the hard limit (ulimit -Hn, or LimitNOFILE= under systemd) "
                "or lower --max-clients", limit, max_services, max_clients, need)
