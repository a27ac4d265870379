"""The master's CPU scheduling policy (``--master-sched``), read back from the kernel."""

from __future__ import annotations

import os

import pytest

from bench.load import ask
from bench.server import Server
from shared import cpu_sched

APP = "tests.apps.handlers:pid"


def policy_of(pid: int) -> int:
    return os.sched_getscheduler(pid) & ~os.SCHED_RESET_ON_FORK


@pytest.mark.parametrize(("args", "expected"), [
    ((), os.SCHED_BATCH),
    (("--master-sched", "batch"), os.SCHED_BATCH),
    (("--master-sched", "normal"), os.SCHED_OTHER),
])
def test_master_runs_under_the_chosen_policy_and_workers_under_the_default(
    server_factory: type[Server], args: tuple[str, ...], expected: int
) -> None:
    server = server_factory("--app", APP, *args, workers=2).start()
    assert policy_of(server.pid) == expected
    # Workers are started after the master switched, and do not inherit it.
    assert [policy_of(pid) for pid in server.worker_pids()] == [os.SCHED_OTHER] * 2
    name = "batch" if expected == os.SCHED_BATCH else "normal"
    assert f"policy round-robin (window 64, master sched {name}, compiled hand-off)" in server.log
    assert ask(server.port).split()[1]


def test_workers_restarted_later_do_not_inherit_it(server_factory: type[Server]) -> None:
    server = server_factory("--app", APP, workers=1).start()
    (first,) = server.worker_pids()
    os.kill(first, 9)
    server.wait_line(r"worker 0 \(pid \d+\) ready")
    (second,) = server.worker_pids()
    assert second != first and policy_of(second) == os.SCHED_OTHER
    assert policy_of(server.pid) == os.SCHED_BATCH


def test_shared_accept_leaves_the_master_alone(server_factory: type[Server]) -> None:
    server = server_factory("--app", APP, "--policy", "shared", workers=1).start()
    assert policy_of(server.pid) == os.SCHED_OTHER


def test_apply_and_current_in_process() -> None:
    before = os.sched_getscheduler(0)
    try:
        assert cpu_sched.apply("batch") is None
        assert cpu_sched.current() == "batch"
        assert cpu_sched.apply("normal") is None
        assert cpu_sched.current() == "normal"
        with pytest.raises(ValueError, match="unknown scheduling mode"):
            cpu_sched.apply("fifo")
        # From normal: switched, and children are to switch back to normal.
        assert cpu_sched.switch("batch") == ("normal", None)
        assert cpu_sched.current() == "batch"
        # Already there: nothing for children to undo.
        assert cpu_sched.switch("batch") == (None, None)
        # Started under another policy on purpose (here idle): kept.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        assert cpu_sched.switch("batch") == (None, f"started under policy {os.SCHED_IDLE}, which is kept")
        assert os.sched_getscheduler(0) == os.SCHED_IDLE
    finally:
        os.sched_setscheduler(0, before, os.sched_param(0))
