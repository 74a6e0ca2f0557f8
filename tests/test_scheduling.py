"""The programs' CPU scheduling policy (tcprelay.scheduling, --cpu-policy)."""

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
                                                                             procs):
    ports = free_port_range(2)
    relay = procs.relay(ports[0], *quick(*(pool_args(ports[1:]) + list(option))))
    echo, _ = procs.echo(ports[0], *option)
    for process in (relay, echo):
        # Registered, each has threads besides the main one (accept, reader, writer).
        wait_until(lambda: len(thread_policies(process.pid)) > 1,
                   what="%r to start its threads" % process)
        assert set(thread_policies(process.pid).values()) == {policy}, process


def test_relay_main_puts_the_process_thread_stack_size_back(tmp_path):
    # In this process main() gets past its checks, sets the stack size for its
    # threads, and stops at the access log it cannot open.
    assert relay_module.THREAD_STACK_SIZE != threading.stack_size()   # or this shows nothing
    stack_before = threading.stack_size()
    ports = free_port_range(2)
    run = MainRun("tcprelay.relay", [ports[0], "--host", "127.0.0.1", "--public-bind",
                                     "127.0.0.1", "--access-log",
                                     str(tmp_path / "missing" / "a.log")] + pool_args(ports[1:]))
    assert run.wait() == 1, run.stderr_text()
    assert threading.stack_size() == stack_before
