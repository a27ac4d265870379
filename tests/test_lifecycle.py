"""A worker process's state machine (every rule of it), the slot's derived state, the restart backoff."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dispatcher.lifecycle import Backoff, Event, Life, TransitionError, WorkerError, WorkerState
from dispatcher.slots import Slot
from dispatcher.stats import Totals

S = WorkerState
E = Event

#: (state, event) -> the state it leads to; every pair not here is refused.
MOVES = {
    (S.STARTING, E.READY): S.READY,
    (S.STARTING, E.DRAIN): S.DRAINING,
    (S.STARTING, E.STOP): S.STOPPING,
    (S.STARTING, E.BOOT_TIMEOUT): S.STOPPING,
    (S.STARTING, E.EXIT): S.EXITED,
    (S.READY, E.DRAIN): S.DRAINING,
    (S.READY, E.STOP): S.STOPPING,
    (S.READY, E.EXIT): S.EXITED,
    (S.DRAINING, E.STOP): S.STOPPING,
    (S.DRAINING, E.EXIT): S.EXITED,
    (S.STOPPING, E.EXIT): S.EXITED,
}
#: Pairs that are allowed and change nothing: told twice, or told less than it already was.
UNCHANGED = [
    (S.DRAINING, E.READY), (S.STOPPING, E.READY),
    (S.DRAINING, E.DRAIN), (S.STOPPING, E.DRAIN), (S.EXITED, E.DRAIN),
    (S.STOPPING, E.STOP), (S.EXITED, E.STOP),
]
PROCESS_STATES = [s for s in S if s is not S.BACKOFF]


def life_in(state: WorkerState, said_ready: bool = False) -> Life:
    return Life(state=state, said_ready=said_ready)


@pytest.mark.parametrize(("state", "event"), list(MOVES), ids=lambda v: v.value)
def test_transition(state: WorkerState, event: Event) -> None:
    life = life_in(state)
    assert life.handle(event) is True
    assert life.state is MOVES[(state, event)]


@pytest.mark.parametrize(("state", "event"), UNCHANGED, ids=lambda v: v.value)
def test_transition_that_changes_nothing_is_allowed_and_says_so(state: WorkerState, event: Event) -> None:
    life = life_in(state)
    assert life.handle(event) is False
    assert life.state is state


@pytest.mark.parametrize(
    ("state", "event"),
    [(s, e) for s in PROCESS_STATES for e in E
     if (s, e) not in MOVES and (s, e) not in UNCHANGED and e is not E.READY],
    ids=lambda v: v.value,
)
def test_transition_the_master_cannot_ask_for_is_refused(state: WorkerState, event: Event) -> None:
    life = life_in(state)
    with pytest.raises(TransitionError):
        life.handle(event)
    assert life.state is state


def test_transition_exited_to_ready_is_refused() -> None:
    life = life_in(S.EXITED)
    with pytest.raises(TransitionError):
        life.handle(E.READY)


@pytest.mark.parametrize("state", [S.READY, S.DRAINING, S.STOPPING], ids=lambda v: v.value)
def test_transition_ready_a_second_time_is_the_workers_fault(state: WorkerState) -> None:
    life = life_in(state, said_ready=True)
    with pytest.raises(WorkerError, match="sent ready twice"):
        life.handle(E.READY)
    assert life.state is state


def test_transition_starting_to_ready_remembers_it_said_ready() -> None:
    life = Life()
    assert (life.state, life.said_ready) == (S.STARTING, False)
    life.handle(E.READY)
    life.handle(E.DRAIN)
    assert life.said_ready and life.leaving
    with pytest.raises(WorkerError):
        life.handle(E.READY)


def test_transition_starting_to_stopping_on_boot_timeout_marks_a_failed_boot() -> None:
    life = Life()
    life.handle(E.BOOT_TIMEOUT)
    assert life.state is S.STOPPING and life.boot_timed_out
    stopped = Life()
    stopped.handle(E.STOP)
    assert not stopped.boot_timed_out


def test_transition_draining_before_ready_ignores_ready_however_often() -> None:
    life = Life()
    life.handle(E.DRAIN)
    assert life.handle(E.READY) is False
    assert life.handle(E.READY) is False  # it never was ready: not "twice"
    assert life.state is S.DRAINING and not life.said_ready


def test_a_refused_transition_changes_nothing() -> None:
    life = life_in(S.EXITED)
    with pytest.raises(TransitionError):
        life.handle(E.READY)
    assert life.state is S.EXITED and not life.said_ready


def test_no_transition_leads_into_backoff() -> None:
    """BACKOFF is a slot's state while its restart waits, never a process's."""
    assert S.BACKOFF not in MOVES.values()
    for state in PROCESS_STATES:
        for event in E:
            life = life_in(state)
            try:
                life.handle(event)
            except (TransitionError, WorkerError):
                continue
            assert life.state is not S.BACKOFF


def test_slot_state_is_derived_from_its_process_and_restart_timer() -> None:
    class Process:
        state = S.READY

    slot = Slot(3, totals=Totals())
    assert slot.state is S.EXITED
    process: Any = Process()
    slot.worker = process
    assert slot.state is S.READY
    slot.worker = None
    loop = asyncio.new_event_loop()
    try:
        slot.restart_timer = loop.call_later(60, lambda: None)
        assert slot.state is S.BACKOFF
        slot.cancel_restart()
        assert slot.state is S.EXITED and slot.restart_timer is None
    finally:
        loop.close()


def test_backoff_grows_by_half_per_crash_in_a_row_and_caps_at_15_s() -> None:
    backoff = Backoff()
    delays = [backoff.next_delay(ready_for_s=None) for _ in range(14)]
    assert delays[:4] == pytest.approx([0.1, 0.15, 0.225, 0.3375])
    assert max(delays) == 15.0
    assert delays[-1] == 15.0


def test_backoff_counts_a_death_soon_after_ready_as_a_crash() -> None:
    backoff = Backoff()
    assert backoff.next_delay(ready_for_s=0.01) == pytest.approx(0.1)
    assert backoff.next_delay(ready_for_s=0.49) == pytest.approx(0.15)
    assert backoff.crashes == 2


def test_backoff_restarts_a_process_that_served_at_once_and_starts_over() -> None:
    backoff = Backoff()
    for _ in range(5):
        backoff.next_delay(ready_for_s=None)
    assert backoff.next_delay(ready_for_s=0.5) == 0.0
    assert backoff.crashes == 0
    assert backoff.next_delay(ready_for_s=None) == pytest.approx(0.1)


def test_life_notes_when_it_became_ready_once() -> None:
    life = Life()
    life.handle(Event.DRAIN)
    life.handle(Event.READY)  # told to drain first: it never served
    assert life.ready_at is None and not life.said_ready
    life = Life()
    life.handle(Event.READY)
    assert life.ready_at is not None and life.said_ready
