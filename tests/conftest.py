"""The fixtures the test modules share (plain helpers: tests/helpers/).

Environments for in-process relays (``relay_env``, ``service_env``,
``security_env``, ``relay_env_errors_allowed``) and log watchers (``logs``,
``warning_logs``) come in named flavours; a module picks one for its tests
with a fixture of its own, e.g. ``def env(service_env): return service_env``;
so do the starters of child processes (``procs``, ``procs_no_listener_check``).
"""

import logging

import pytest

from helpers.basics import LeakCheck
from helpers.envs import Env, SecurityEnv, ServiceEnv
from helpers.logwatch import LogWatcher
from helpers.processes import Starter
from helpers.sessions import RawPeer, SessionPair
from tcprelay import auth


@pytest.fixture
def no_leaks():
    """Fails the test if it leaves threads running or files open."""
    check = LeakCheck()
    yield check
    check.assert_clean()


@pytest.fixture
def sessions(no_leaks):
    pair = SessionPair()
    yield pair
    pair.close()


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


# -- in-process relays ----------------------------------------------------------------------

def _closed_without_errors(environment, caplog):
    """Yields ``environment``, closes it, then fails the test if tcprelay logged an error."""
    caplog.set_level(logging.INFO, logger="tcprelay")
    yield environment
    environment.close()
    crashes = [r for r in caplog.records
               if r.name.startswith("tcprelay") and r.levelno >= logging.ERROR]
    assert not crashes, "tcprelay logged errors: %s" % [r.getMessage() for r in crashes]


@pytest.fixture
def relay_env(no_leaks, caplog):
    """An ``Env``; the test fails if tcprelay logs an error."""
    yield from _closed_without_errors(Env(), caplog)


@pytest.fixture
def relay_env_errors_allowed(no_leaks):
    """An ``Env`` without the check that tcprelay logged no error (as test_extremes
    has always run: relay restarts, sessions out of stream ids)."""
    environment = Env()
    yield environment
    environment.close()


@pytest.fixture
def service_env(no_leaks, caplog):
    """A ``ServiceEnv``; the test fails if tcprelay logs an error."""
    yield from _closed_without_errors(ServiceEnv(), caplog)


@pytest.fixture
def security_env(no_leaks, caplog, warning_logs):
    """A ``SecurityEnv``; the test fails if tcprelay logs an error."""
    yield from _closed_without_errors(SecurityEnv(), caplog)


# -- tcprelay's log --------------------------------------------------------------------------

@pytest.fixture
def logs():
    """A ``LogWatcher`` on the tcprelay logger, set to INFO for the test; its
    ``messages`` look at every level unless told, ``wait_for`` returns the first
    ``count`` messages."""
    watcher = LogWatcher()
    logger = logging.getLogger("tcprelay")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(watcher)
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(level)


@pytest.fixture
def warning_logs():
    """A ``LogWatcher`` on the tcprelay logger, whose level it leaves alone; its
    ``messages`` and ``wait_for`` look at WARNING and up unless told, and
    ``wait_for`` returns every match (so a test can see there is no extra one)."""
    watcher = LogWatcher(default_level=logging.WARNING, wait_returns_all=True)
    logger = logging.getLogger("tcprelay")
    logger.addHandler(watcher)
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)


# -- child processes ------------------------------------------------------------------------

def _closed_at_the_end(starter, monkeypatch):
    """Yields ``starter`` with $TCPRELAY_SECRET unset (a start may set it for its
    child); closes every process it started at the end, whatever happened."""
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)
    try:
        yield starter
    finally:
        starter.close()


@pytest.fixture
def procs(monkeypatch):
    """A ``Starter`` whose ``relay()`` checks that 127.0.0.1 alone listens on its port."""
    yield from _closed_at_the_end(Starter(check_listeners=True), monkeypatch)


@pytest.fixture
def procs_no_listener_check(monkeypatch):
    """A ``Starter`` whose ``relay()`` does not look at the port's listeners."""
    yield from _closed_at_the_end(Starter(check_listeners=False), monkeypatch)
