"""How a tcprelay program's threads run on the CPUs (Linux): their scheduling
policy (``--cpu-policy``) and the CPUs they may run on (``--cpu``).

Under Linux's default policy (``SCHED_OTHER``) a thread woken on a busy CPU
often preempts its waker at once. Between our threads that is wasted: the
woken thread needs the GIL, which its waker still holds, so it sleeps again
until the waker blocks, and each handoff costs two context switches instead
of one. A woken ``SCHED_BATCH`` thread never preempts the running one
(sched(7); the kernel's ``check_preempt_wakeup`` skips it); its share of the
CPU and its nice value are unchanged. Measured in docs/PERFORMANCE.md ("Thread
switches: SCHED_BATCH and one CPU per process"): about 1.4x the small requests
and new connections a second.

The programs (relay, echo server, adapter, the service CLIs) run with the
batch policy unless ``--cpu-policy default`` is given. A program using the
library may do the same by entering ``applied("batch")`` (and CPUs, if it
wants them) before it starts its threads.

``--cpu`` keeps all of a program's threads on the CPUs given (as ``taskset
-c`` or systemd's ``CPUAffinity=`` would). Only one thread runs Python code at
a time, and a thread woken on another CPU costs that CPU a wake-up (an
interrupt, dear on a virtual machine) and the GIL a trip between CPUs; on one
CPU small requests and new connections cost half as much, bulk transfers a
little more when two busy processes share the CPU (docs/PERFORMANCE.md).
"""

import argparse
import contextlib
import logging
import os
import re

log = logging.getLogger(__name__)

POLICIES = ("batch", "default")
DEFAULT_POLICY = "batch"
HELP = ("the CPU scheduling policy of this program's threads (Linux; elsewhere both are "
        "the same): 'batch' keeps a thread that wakes another from being preempted by it, "
        "which saves a context switch per handoff (about 1.4x the small requests and new "
        "connections a second); 'default' leaves the policy this program was started with. Only the "
        "usual policy is replaced: one set by chrt or systemd's CPUSchedulingPolicy= "
        "stays (default: batch)")


CPU_HELP = ("run this program's threads on these CPUs only, a list like 1 or 0,2 or 0-3 (as "
            "taskset -c). A busy relay or service kept on one CPU handles more small requests "
            "and new connections a second (threads woken on another CPU cost more than the "
            "work; docs/PERFORMANCE.md); give each such process its own, one nothing else "
            "keeps busy (beside a busy program, add --cpu-policy default). Linux only "
            "(default: any CPU)")


# sched_getscheduler ORs this flag into the policy (chrt -R, systemd's
# CPUSchedulingResetOnFork=); an unprivileged thread may not clear it.
_RESET_ON_FORK = getattr(os, "SCHED_RESET_ON_FORK", 0)


def supported():
    """True where the batch policy exists (Linux)."""
    return hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_BATCH")


def add_options(parser):
    """``--cpu-policy`` and ``--cpu`` on an argparse parser."""
    parser.add_argument("--cpu-policy", choices=POLICIES, default=DEFAULT_POLICY, help=HELP)
    parser.add_argument("--cpu", type=cpu_list, metavar="CPUS", default=None, help=CPU_HELP)


def cpu_list(text):
    """The set of CPU numbers in ``text`` ("1", "0,2", "0-3"), each one this process
    may run on; raises argparse.ArgumentTypeError saying what is wrong."""
    if not hasattr(os, "sched_setaffinity"):
        raise argparse.ArgumentTypeError("choosing CPUs needs Linux; leave --cpu out here")
    ranges = []
    for part in text.split(","):
        match = _CPU_RANGE.match(part.strip())
        if match is None:
            raise argparse.ArgumentTypeError("%r is not a list of CPUs like 1, 0,2 or 0-3"
                                             % text)
        if int(match.group(2) or match.group(1)) < int(match.group(1)):
            raise argparse.ArgumentTypeError("%r: a range of CPUs goes from low to high, "
                                             "like 0-3" % text)
        ranges.append((int(match.group(1)), int(match.group(2) or match.group(1))))
    available = os.sched_getaffinity(0)
    top = max(available)
    cpus, missing, beyond = set(), set(), []
    for low, high in ranges:
        if high > top:   # not expanded: "0-4294967296" must not build a set that large
            beyond.append((max(low, top + 1), high))
            high = top
        span = set(range(low, high + 1))
        cpus |= span & available
        missing |= span - available
    if missing or beyond:
        count = len(missing) + sum(high - low + 1 for low, high in beyond)
        named = [format_cpus(missing)] if missing else []
        named += [str(low) if low == high else "%d-%d" % (low, high) for low, high in beyond]
        if available == set(range(os.cpu_count() or 0)):
            where = "this machine has CPUs %s" % format_cpus(available)
        else:
            where = ("this program may run on %s only (limited when it was started: by "
                     "taskset, systemd's CPUAffinity= or a cpuset)" % format_cpus(available))
        raise argparse.ArgumentTypeError("%s %s %s not available: %s" % (
            "CPU" if count == 1 else "CPUs", ",".join(named),
            "is" if count == 1 else "are", where))
    return cpus


_CPU_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?$")


def format_cpus(cpus):
    """``{0, 1, 2, 5}`` as "0-2,5"."""
    runs = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else "%d-%d" % (a, b) for a, b in runs)


def batch():
    """Put the calling thread (and the threads it starts from now on, which
    inherit it) under ``SCHED_BATCH``. Returns True if it did; False where the
    policy does not exist or the system refuses (a sandbox, say: logged)."""
    if not supported():
        return False
    try:
        keep = os.sched_getscheduler(0) & _RESET_ON_FORK
        os.sched_setscheduler(0, os.SCHED_BATCH | keep, os.sched_param(0))
    except OSError as exc:
        log.info("cannot use the batch CPU scheduling policy (%s); running with the "
                 "default one", exc.strerror or exc)
        return False
    return True


@contextlib.contextmanager
def applied(policy, cpus=None):
    """Run the block under ``policy`` (one of POLICIES) and on ``cpus`` on the
    calling thread, which the threads it starts meanwhile inherit; the calling
    thread's own settings are put back afterwards (a program's main() called
    in-process).

    ``cpus``: None for any, CPU numbers (an int or a set of them), or text as
    ``--cpu`` takes it ("1", "0,2", "0-3"). Raises ValueError for an unknown
    policy, no CPUs, or text that is no list of CPUs; CPUs the system refuses
    are a warning, and the block runs on the CPUs it had.
    """
    if policy not in POLICIES:
        raise ValueError("unknown CPU scheduling policy %r (one of %s)"
                         % (policy, ", ".join(POLICIES)))
    cpus = _cpu_set(cpus)
    with _affinity(cpus), _policy(policy):
        yield


def _cpu_set(cpus):
    """``applied``'s ``cpus`` as a set of ints (or None); ValueError if it is none."""
    if cpus is None:
        return None
    if isinstance(cpus, str):
        if not hasattr(os, "sched_setaffinity"):
            return {0}   # any number: _affinity says CPUs cannot be chosen here
        try:
            return cpu_list(cpus)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc))
    if isinstance(cpus, int):
        cpus = {cpus}
    cpus = set(cpus)
    if not cpus or not all(isinstance(cpu, int) and cpu >= 0 for cpu in cpus):
        raise ValueError("CPUs are numbers from 0, at least one: not %r" % (cpus,))
    return cpus


@contextlib.contextmanager
def _affinity(cpus):
    if cpus is None:
        yield
        return
    if not hasattr(os, "sched_setaffinity"):
        log.warning("cannot keep to CPU %s: this system has no way to choose CPUs; "
                    "running on any", format_cpus(cpus))
        yield
        return
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        log.warning("cannot keep to CPU %s (%s); running on CPU %s", format_cpus(cpus),
                    exc.strerror or exc, format_cpus(before))
        yield
        return
    log.info("running on CPU %s", format_cpus(cpus))
    try:
        yield
    finally:
        try:
            os.sched_setaffinity(0, before)
        except OSError as exc:   # those CPUs went offline, or out of our cpuset, meanwhile
            log.debug("cannot put back CPU %s (%s)", format_cpus(before), exc.strerror or exc)


@contextlib.contextmanager
def _policy(policy):
    if policy != "batch" or not supported():
        yield
        return
    try:
        before = (os.sched_getscheduler(0), os.sched_getparam(0))
    except OSError:
        before = None
    changed = before is not None and _replaceable(before[0]) and batch()
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


def _replaceable(policy):
    """Whether batch is to replace ``policy`` (sched_getscheduler's): only the
    usual one is. A real-time or idle policy was chosen by whoever started us."""
    policy &= ~_RESET_ON_FORK
    if policy == os.SCHED_OTHER:
        return True
    if policy != os.SCHED_BATCH:
        names = {getattr(os, "SCHED_" + name, None): name.lower()
                 for name in ("FIFO", "RR", "IDLE")}
        log.info("keeping the CPU scheduling policy this program was started with (%s), "
                 "not batch", names.get(policy, policy))
    return False
