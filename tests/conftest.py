"""The fixtures the test modules share (plain helpers: tests/helpers/)."""

import pytest

from helpers.basics import LeakCheck
from helpers.sessions import RawPeer, SessionPair

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
