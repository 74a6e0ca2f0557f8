"""The programs' CPU scheduling policy (tcprelay.scheduling, --cpu-policy)."""

import argparse
import logging
import os
import threading

import pytest

from helpers.basics import TIMEOUT, free_port_range, pool_args, wait_until
from helpers.processes import MainRun, quick
from tcprelay import relay as relay_module
from tcprelay import scheduling

pytestmark = pytest.mark.skipif(not scheduling.supported(),
                                reason="no SCHED_BATCH here: the policy is Linux's")


@pytest.fixture
def default_policy():
    """The test thread under SCHED_OTHER (as a program usually starts), put back after."""
    before = os.sched_getscheduler(0), os.sched_getparam(0)
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    yield
    os.sched_setscheduler(0, *before)


def thread_policies(pid):
    """{thread id: policy} of every thread of ``pid``."""
    policies = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            policies[int(tid)] = os.sched_getscheduler(int(tid))
        except ProcessLookupError:
            pass   # ended meanwhile
    return policies


def test_batch_is_applied_to_the_block_and_its_threads_then_put_back(default_policy):
    seen = []
    with scheduling.applied("batch"):
        assert os.sched_getscheduler(0) == os.SCHED_BATCH
        thread = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))
        thread.start()
        thread.join(TIMEOUT)
    assert seen == [os.SCHED_BATCH]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_the_default_policy_changes_nothing(default_policy):
    with scheduling.applied("default"):
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_a_thread_already_batch_stays_batch_after_the_block(default_policy):
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    with scheduling.applied("batch"):
        assert os.sched_getscheduler(0) == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == os.SCHED_BATCH


def test_a_refusal_is_logged_and_the_program_runs_on(default_policy, monkeypatch, caplog):
    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    caplog.set_level(logging.INFO, logger="tcprelay.scheduling")
    with scheduling.applied("batch"):
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert "cannot use the batch CPU scheduling policy (Operation not permitted)" in caplog.text


@pytest.mark.parametrize("option, policy", [((), os.SCHED_BATCH),
                                            (("--cpu-policy", "default"), os.SCHED_OTHER)])
def test_the_relay_and_the_echo_server_run_every_thread_under_their_policy(option, policy,
                                                                             default_policy,
                                                                             procs):
    # The children start from this thread under SCHED_OTHER (default_policy),
    # even when the tests themselves run under batch (chrt -b).
    ports = free_port_range(2)
    relay = procs.relay(ports[0], *quick(*(pool_args(ports[1:]) + list(option))))
    echo, _ = procs.echo(ports[0], *option)
    for process in (relay, echo):
        # Registered, each has threads besides the main one (accept, reader, writer).
        wait_until(lambda: len(thread_policies(process.pid)) > 1,
                   what="%r to start its threads" % process)
        assert set(thread_policies(process.pid).values()) == {policy}, process


@pytest.fixture
def kept_stack_size():
    """The process's thread stack size, put back even if the test fails."""
    before = threading.stack_size()
    yield before
    threading.stack_size(before)


@pytest.fixture
def kept_affinity():
    """The test thread's CPUs, put back even if the test fails."""
    before = os.sched_getaffinity(0)
    yield before
    os.sched_setaffinity(0, before)


def test_relay_main_puts_the_process_thread_stack_size_back(tmp_path, kept_stack_size):
    # In this process main() gets past its checks, sets the stack size for its
    # threads, and stops at the access log it cannot open.
    assert relay_module.THREAD_STACK_SIZE != kept_stack_size   # or this shows nothing
    stack_before = kept_stack_size
    ports = free_port_range(2)
    run = MainRun("tcprelay.relay", [ports[0], "--host", "127.0.0.1", "--public-bind",
                                     "127.0.0.1", "--access-log",
                                     str(tmp_path / "missing" / "a.log")] + pool_args(ports[1:]))
    assert run.wait() == 1, run.stderr_text()
    assert threading.stack_size() == stack_before


def thread_affinities(pid):
    """{thread id: its set of CPUs} of every thread of ``pid``."""
    affinities = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            affinities[int(tid)] = frozenset(os.sched_getaffinity(int(tid)))
        except ProcessLookupError:
            pass
    return affinities


@pytest.mark.parametrize("text, cpus", [("0", {0}), ("0,0", {0}), ("0-0", {0}),
                                        ("0,2", {0, 2}), ("0-3", {0, 1, 2, 3}),
                                        ("1,3-5,7", {1, 3, 4, 5, 7}), (" 0 , 2", {0, 2})])
def test_cpu_lists_read_as_taskset_writes_them(text, cpus, monkeypatch):
    # Any machine: a cpuset without CPU 0 (taskset -c 1, a container) included.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert scheduling.cpu_list(text) == cpus


def test_a_cpu_list_of_available_cpus_is_taken():
    cpu = min(os.sched_getaffinity(0))
    assert scheduling.cpu_list("%d,%d-%d" % (cpu, cpu, cpu)) == {cpu}


@pytest.mark.parametrize("text, message", [
    ("x", "'x' is not a list of CPUs like 1, 0,2 or 0-3"),
    ("1-0", "'1-0': a range of CPUs goes from low to high, like 0-3"),
    ("-1", "'-1' is not a list of CPUs like 1, 0,2 or 0-3"),
    ("0,", "'0,' is not a list of CPUs like 1, 0,2 or 0-3"),
    ("1_0", "'1_0' is not a list of CPUs like 1, 0,2 or 0-3"),
    ("\u0661", "'\u0661' is not a list of CPUs like 1, 0,2 or 0-3"),   # int() would take it
    ("4096", "CPU 4096 is not available: "),
    ("4096-4097", "CPUs 4096-4097 are not available: ")])
def test_a_wrong_cpu_list_says_what_is_wrong(text, message):
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        scheduling.cpu_list(text)
    assert str(caught.value).startswith(message), str(caught.value)


def test_format_cpus_joins_runs():
    assert scheduling.format_cpus({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"


def test_cpus_apply_to_the_block_and_its_threads_then_come_back(kept_affinity):
    before = kept_affinity
    one = {min(before)}
    seen = []
    with scheduling.applied("default", one):
        assert os.sched_getaffinity(0) == one
        thread = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
        thread.start()
        thread.join(TIMEOUT)
    assert seen == [one]
    assert os.sched_getaffinity(0) == before


def test_the_relay_and_the_echo_server_keep_every_thread_on_the_cpu_given(procs):
    cpu = max(os.sched_getaffinity(0))
    ports = free_port_range(2)
    relay = procs.relay(ports[0], *quick("--cpu", str(cpu), *pool_args(ports[1:])))
    echo, public = procs.echo(ports[0], "--cpu", str(cpu))
    assert "running on CPU %d" % cpu in relay.stderr_text()
    for process in (relay, echo):
        wait_until(lambda: len(thread_affinities(process.pid)) > 1,
                   what="%r to start its threads" % process)
        assert set(thread_affinities(process.pid).values()) == {frozenset([cpu])}, process


def test_a_cpu_not_available_is_a_usage_error():
    run = MainRun("tcprelay.relay", ["8700", "--cpu", "4096"])
    assert run.wait() == 2
    line, = run.stderr_lines()
    assert line.startswith("python3 -m tcprelay.relay: error: argument --cpu: CPU 4096 is not "
                           "available: "), line
    assert scheduling.format_cpus(os.sched_getaffinity(0)) in line and \
        line.endswith(" (see --help)"), line


@pytest.mark.parametrize("available, said", [
    ({0, 1}, "CPU 5 is not available: this machine has CPUs 0-1"),
    ({0}, "CPU 5 is not available: this program may run on 0 only (limited when it was "
          "started: by taskset, systemd's CPUAffinity= or a cpuset)")])
def test_cpus_not_available_say_whether_the_machine_or_the_start_limits_them(available, said,
                                                                             monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(available))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        scheduling.cpu_list("5")
    assert str(caught.value) == said


@pytest.mark.parametrize("policy, cpus, message", [
    ("fast", None, "unknown CPU scheduling policy 'fast' (one of batch, default)"),
    ("Batch", None, "unknown CPU scheduling policy 'Batch'"),
    ("batch", set(), "CPUs are numbers from 0, at least one: not set()"),
    ("batch", {-1}, "CPUs are numbers from 0, at least one"),
    ("batch", "x", "'x' is not a list of CPUs like 1, 0,2 or 0-3")])
def test_applied_refuses_what_is_no_policy_or_no_cpus(policy, cpus, message, kept_affinity):
    with pytest.raises(ValueError) as caught:
        with scheduling.applied(policy, cpus):
            pass
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize("form", ["text", "int"])
def test_applied_takes_cpus_as_the_option_writes_them_or_as_a_number(form, kept_affinity):
    cpu = min(kept_affinity)
    with scheduling.applied("default", str(cpu) if form == "text" else cpu):
        assert os.sched_getaffinity(0) == {cpu}
    assert os.sched_getaffinity(0) == kept_affinity


def test_cpus_refused_by_the_system_are_a_warning_and_the_program_runs_on(monkeypatch, caplog):
    before = os.sched_getaffinity(0)

    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    with scheduling.applied("default", {min(before)}):
        assert os.sched_getaffinity(0) == before
    assert ("cannot keep to CPU %d (Operation not permitted); running on CPU %s"
            % (min(before), scheduling.format_cpus(before))) in caplog.text


def in_a_thread_of_its_own(policy, body):
    """``body()``'s result, run by a new thread under ``policy`` (sched_setscheduler's),
    which ends with it: nothing to put back in this one."""
    result = []

    def run():
        os.sched_setscheduler(0, policy, os.sched_param(0))
        result.append(body())
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(TIMEOUT)
    assert result, "the thread failed"
    return result[0]


def policies_in_and_after_block(policy, cpus=None):
    """(the thread's policy in the block, a thread's started there, the thread's after)."""
    def body():
        seen = []
        with scheduling.applied(policy, cpus):
            inside = os.sched_getscheduler(0)
            started = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))
            started.start()
            started.join(TIMEOUT)
        return inside, seen, os.sched_getscheduler(0)
    return body


def test_a_policy_chosen_by_whoever_started_the_program_is_kept(caplog):
    # chrt -i or systemd's CPUSchedulingPolicy=idle: batch would take its threads out of idle.
    caplog.set_level(logging.INFO, logger="tcprelay.scheduling")
    inside, seen, after = in_a_thread_of_its_own(os.SCHED_IDLE,
                                                  policies_in_and_after_block("batch"))
    assert (inside, seen, after) == (os.SCHED_IDLE, [os.SCHED_IDLE], os.SCHED_IDLE)
    assert "keeping the CPU scheduling policy this program was started with (idle)" \
        in caplog.text


def test_reset_on_fork_stays_set_under_batch():
    # chrt -R, systemd's CPUSchedulingResetOnFork=: an unprivileged thread may not
    # clear the flag, so batch without it would be refused.
    flag = os.SCHED_RESET_ON_FORK
    inside, seen, after = in_a_thread_of_its_own(os.SCHED_OTHER | flag,
                                                  policies_in_and_after_block("batch"))
    assert (inside, seen, after) == (os.SCHED_BATCH | flag, [os.SCHED_BATCH],
                                     os.SCHED_OTHER | flag)


def test_cpus_that_cannot_be_put_back_end_the_block_quietly(monkeypatch):
    # The CPUs of before went offline or out of the cpuset while the program ran.
    before = os.sched_getaffinity(0)
    calls = []
    real = os.sched_setaffinity

    def refuse_the_second(pid, cpus):
        calls.append(set(cpus))
        if len(calls) > 1:
            raise OSError(22, "Invalid argument")
        real(pid, cpus)
    monkeypatch.setattr(os, "sched_setaffinity", refuse_the_second)
    try:
        with scheduling.applied("default", {min(before)}):
            pass
        assert calls == [{min(before)}, before]
    finally:
        real(0, before)


def test_cpus_where_they_cannot_be_chosen_are_a_warning(kept_affinity, monkeypatch, caplog):
    monkeypatch.delattr(os, "sched_setaffinity")
    with scheduling.applied("default", {min(kept_affinity)}):
        pass
    assert ("cannot keep to CPU %d: this system has no way to choose CPUs; running on any"
            % min(kept_affinity)) in caplog.text


def test_a_huge_cpu_range_is_refused_without_being_counted_out(monkeypatch):
    # "0-4294967296" once built a set of four billion numbers (a new user's try:
    # the relay hung, eating memory). Ranges past the last CPU are never expanded.
    real_range = range

    def small_range(*args):
        numbers = real_range(*args)
        assert len(numbers) <= 4096, "expanded %r" % (numbers,)
        return numbers
    monkeypatch.setattr(scheduling, "range", small_range, raising=False)
    top = max(os.sched_getaffinity(0))
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        scheduling.cpu_list("0-4294967296")
    assert str(caught.value).startswith("CPUs %d-4294967296 are not available: " % (top + 1))
