"""The CPU scheduling policy of a tcprelay program's threads (Linux).

Under Linux's default policy (``SCHED_OTHER``) a thread woken on a busy CPU
often preempts its waker at once. Between our threads that is wasted: the
woken thread needs the GIL, which its waker still holds, so it sleeps again
until the waker blocks, and each handoff costs two context switches instead
of one. A woken ``SCHED_BATCH`` thread never preempts the running one
(sched(7); the kernel's ``check_preempt_wakeup`` skips it); its share of the
CPU and its nice value are unchanged. Measured in docs/PERFORMANCE.md: about
a quarter more small requests and a fifth more new connections a second.

The programs (relay, echo server, adapter, the service CLIs) run with the
batch policy unless ``--cpu-policy default`` is given. A program using the
library may do the same with ``batch()`` before it starts its threads.
"""

import contextlib
import logging
import os

log = logging.getLogger(__name__)

POLICIES = ("batch", "default")
DEFAULT_POLICY = "batch"
HELP = ("the CPU scheduling policy of this program's threads: 'batch' keeps a thread "
        "that wakes another from being preempted by it, which saves a context switch "
        "per handoff (about a quarter more small requests a second); 'default' leaves "
        "the policy this program was started with (default: batch; Linux only, "
        "elsewhere both are the same)")


def supported():
    """True where the batch policy exists (Linux)."""
    return hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_BATCH")


def add_option(parser):
    """``--cpu-policy`` on an argparse parser."""
    parser.add_argument("--cpu-policy", choices=POLICIES, default=DEFAULT_POLICY, help=HELP)


def batch():
    """Put the calling thread (and the threads it starts from now on, which
    inherit it) under ``SCHED_BATCH``. Returns True if it did; False where the
    policy does not exist or the system refuses (a sandbox, say: logged)."""
    if not supported():
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as exc:
        log.info("cannot use the batch CPU scheduling policy (%s); running with the "
                 "default one", exc.strerror or exc)
        return False
    return True


@contextlib.contextmanager
def applied(policy):
    """Run the block under ``policy`` (one of POLICIES) on the calling thread,
    which the threads it starts meanwhile inherit; the calling thread's own
    policy is put back afterwards (a program's main() called in-process)."""
    if policy != "batch" or not supported():
        yield
        return
    try:
        before = (os.sched_getscheduler(0), os.sched_getparam(0))
    except OSError:
        before = None
    changed = before is not None and before[0] != os.SCHED_BATCH and batch()
    if changed:
        log.debug("threads run under the batch CPU scheduling policy")
    try:
        yield
    finally:
        if changed:
            try:
                os.sched_setscheduler(0, before[0], before[1])
            except OSError:
                pass   # the old policy cannot come back: the thread keeps batch
