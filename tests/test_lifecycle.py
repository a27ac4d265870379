"""The worker slot state machine and the restart backoff."""

from __future__ import annotations

import asyncio

import pytest

from dispatcher.lifecycle import Backoff, Slot, TransitionError, WorkerState, transition

S = WorkerState

ALLOWED = [
    (S.STARTING, S.READY), (S.STARTING, S.DRAINING), (S.STARTING, S.STOPPING), (S.STARTING, S.EXITED),
    (S.READY, S.DRAINING), (S.READY, S.STOPPING), (S.READY, S.EXITED),
    (S.DRAINING, S.STOPPING), (S.DRAINING, S.EXITED),
    (S.STOPPING, S.EXITED),
    (S.EXITED, S.BACKOFF), (S.EXITED, S.STARTING),
    (S.BACKOFF, S.STARTING), (S.BACKOFF, S.EXITED),
]


@pytest.mark.parametrize(("current", "new"), ALLOWED)
def test_allowed_transition(current: WorkerState, new: WorkerState) -> None:
    assert transition(current, new) is new


@pytest.mark.parametrize(
    ("current", "new"),
    [(a, b) for a in S for b in S if (a, b) not in ALLOWED],
)
def test_forbidden_transition(current: WorkerState, new: WorkerState) -> None:
    with pytest.raises(TransitionError):
        transition(current, new)


def test_slot_state_is_derived_from_its_process_and_restart_timer() -> None:
    class Process:
        state = S.READY

    slot = Slot(3)
    assert slot.state is S.EXITED
    slot.worker = Process()  # type: ignore[assignment]
    assert slot.state is S.READY
    slot.worker = None
    loop = asyncio.new_event_loop()
    try:
        slot.restart_timer = loop.call_later(60, lambda: None)
        assert slot.state is S.BACKOFF
        slot.restart_timer.cancel()
    finally:
        loop.close()


def test_backoff_grows_by_half_and_caps_at_15_s() -> None:
    backoff = Backoff()
    delays = [backoff.next_delay(uptime_s=1.0) for _ in range(14)]
    assert delays[:4] == pytest.approx([0.1, 0.15, 0.225, 0.3375])
    assert max(delays) == 15.0
    assert delays[-1] == 15.0


def test_backoff_resets_after_30_s_of_uptime() -> None:
    backoff = Backoff()
    for _ in range(5):
        backoff.next_delay(uptime_s=0.5)
    assert backoff.next_delay(uptime_s=30.0) == pytest.approx(0.1)
    assert backoff.next_delay(uptime_s=0.5) == pytest.approx(0.15)
