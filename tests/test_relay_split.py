"""relay.py split along its seams (issue 13, the relay half): the relay without
the service library, small modules, and leases whose end the pool alone keeps."""

import ast
import os
import socket
import subprocess
import sys
import threading

from helpers.basics import LOOPBACK, TIMEOUT, wait_until
from tcprelay.leases import Leases
from tcprelay.portpool import PortPool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELAY_MODULES = ["relay", "registrar", "servicelink", "leases", "cli", "servicecli"]
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 60


def test_the_relay_does_not_import_the_service_library():
    code = ("import sys, tcprelay.relay; "
            "print(sorted(m for m in sys.modules if m in ('tcprelay.service', "
            "'tcprelay.servicecli')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, timeout=TIMEOUT, check=True)
    assert out.stdout.decode().strip() == "[]", out


def test_the_relay_modules_and_their_functions_stay_small():
    too_long = []
    for name in RELAY_MODULES:
        path = os.path.join(ROOT, "tcprelay", name + ".py")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append("%s.py: %d lines" % (name, lines))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef):
                # end_lineno is 3.8+: the last line of the last statement then.
                end = max(getattr(n, "lineno", node.lineno) for n in ast.walk(node))
                end = getattr(node, "end_lineno", end)
                if end - node.lineno + 1 > MAX_FUNCTION_LINES:
                    too_long.append("%s.py:%d %s: %d lines"
                                    % (name, node.lineno, node.name, end - node.lineno + 1))
    assert not too_long, too_long


# -- leases: one home for a lease's end ------------------------------------------------------

class Link(object):
    """A ServiceLink stand-in: what Leases reads of one."""

    def __init__(self, said_goodbye=False):
        self.lease = None
        self.said_goodbye = said_goodbye
        self.label = "service stand-in"
        self.closed = threading.Event()

    def close(self):
        self.closed.set()


def _bind(port):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))   # the pool's port numbers are labels here
    listener.listen(1)
    return listener


def _registered(pool, leases, link):
    port, listener = pool.request().wait(TIMEOUT)
    listener.close()
    link.lease = leases.issue(link, port)
    return port


def test_a_lease_holds_exactly_while_the_pool_holds_its_port():
    pool = PortPool([9001, 9002], _bind)
    leases = Leases(pool, lease_time=0.3)
    gone = Link()
    port = _registered(pool, leases, gone)
    assert leases.release(gone, port) is True
    assert pool.held_for(port) == gone.lease
    assert leases.claim(gone.lease, Link()) == (gone.lease, port)
    # The hold ends at the pool: the relay no longer honours the token, which
    # still names its port as a preference.
    wait_until(lambda: pool.held_for(port) is None, what="the hold to end")
    assert leases.claim(gone.lease, Link()) == (None, port)
    assert leases.claim(gone.lease, Link()) == (None, port)


def test_a_service_that_said_goodbye_leaves_no_lease_and_no_hold():
    pool = PortPool([9001], _bind)
    leases = Leases(pool, lease_time=60.0)
    polite = Link(said_goodbye=True)
    port = _registered(pool, leases, polite)
    assert leases.release(polite, port) is False
    assert pool.held_for(port) is None
    assert leases.claim(polite.lease, Link()) == (None, port)


def test_a_relay_that_is_leaving_holds_no_port():
    pool = PortPool([9001], _bind)
    leases = Leases(pool, lease_time=60.0)
    lost = Link()
    port = _registered(pool, leases, lost)
    assert leases.release(lost, port, hold=False) is False
    assert pool.held_for(port) is None
    assert pool.stats()["free"] == 1


def test_a_lease_presented_while_its_holder_is_connected_closes_the_old_connection():
    pool = PortPool([9001], _bind)
    leases = Leases(pool, lease_time=60.0)
    old, new = Link(), Link()
    port = _registered(pool, leases, old)
    assert leases.claim(old.lease, new) == (old.lease, port)
    assert old.closed.wait(TIMEOUT)
    assert leases.claim(old.lease, old) == (old.lease, port)   # its own: nothing closed
    assert not new.closed.is_set()
    # A new lease for the port ends the old one.
    new.lease = leases.issue(new, port)
    assert leases.claim(old.lease, Link()) == (None, port)
