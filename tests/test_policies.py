"""The policies that choose a worker: round-robin's FIFO and window, as examples and as properties."""

from __future__ import annotations

import collections

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dispatcher.policies import RoundRobin


def in_flight(rr: RoundRobin, key: int) -> int:
    """Un-acked hand-offs of worker ``key``, as the policy counts them: its window less its free slots."""
    return rr.window - rr._credit[key]


def test_oldest_free_worker_gets_the_next_connection() -> None:
    rr = RoundRobin()
    for key in (1, 2, 3):
        rr.attach(key)
    assert [rr.choose() for _ in range(3)] == [1, 2, 3]
    assert rr.choose() is None  # window 1: everyone holds one un-acked hand-off
    rr.ack(2, True)
    rr.ack(1, True)
    assert [rr.choose(), rr.choose(), rr.choose()] == [2, 1, None]


def test_window_bounds_unacked_handoffs() -> None:
    rr = RoundRobin(window=3)
    rr.attach(1)
    assert [rr.choose() for _ in range(4)] == [1, 1, 1, None]
    assert in_flight(rr, 1) == 3


def test_a_burst_is_dealt_in_turn_whatever_the_window() -> None:
    rr = RoundRobin(window=3)
    for key in (1, 2, 3):
        rr.attach(key)
    assert [rr.choose() for _ in range(10)] == [1, 2, 3] * 3 + [None]
    rr.ack(2, True)
    rr.ack(1, True)
    assert [rr.choose(), rr.choose(), rr.choose()] == [2, 1, None]


def test_a_detached_worker_is_never_chosen() -> None:
    rr = RoundRobin()
    rr.attach(1)
    rr.attach(2)
    rr.detach(1)
    assert rr.workers == 1
    assert rr.choose() == 2
    rr.ack(1, True)  # an ack from a detached worker gives it nothing back
    assert rr.choose() is None
    rr.detach(2)
    assert rr.workers == 0
    with pytest.raises(ValueError):
        rr.attach(3) or rr.attach(3)


def test_more_acks_than_handoffs_is_an_error() -> None:
    rr = RoundRobin()
    rr.attach(1)
    with pytest.raises(ValueError):
        rr.ack(1, True)


class RoundRobinMachine(RuleBasedStateMachine):
    """Any sequence of attach, detach, report, choose and ack keeps the window and least-loaded promises."""

    def __init__(self) -> None:
        super().__init__()
        self.window = 2
        self.rr = RoundRobin(self.window)
        self.attached: set[int] = set()
        self.unacked: collections.Counter[int] = collections.Counter()
        self.load: dict[int, int] = {}
        self.next_key = 0

    @rule()
    def attach(self) -> None:
        self.next_key += 1
        self.rr.attach(self.next_key)
        self.attached.add(self.next_key)

    @precondition(lambda self: self.attached)
    @rule(data=st.data())
    def detach(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.attached)))
        self.attached.discard(key)
        self.load.pop(key, None)
        self.rr.detach(key)

    @precondition(lambda self: self.attached)
    @rule(data=st.data(), load=st.integers(0, 6))
    def report(self, data: st.DataObject, load: int) -> None:
        key = data.draw(st.sampled_from(sorted(self.attached)))
        self.rr.report(key, load)
        self.load[key] = load

    @rule()
    def choose(self) -> None:
        key = self.rr.choose()
        free = {k for k in self.attached if self.unacked[k] < self.window}
        if key is None:
            assert not free
        else:
            assert key in free
            # Within one of the least loaded as the master knows it: its report
            # plus what it was sent since.
            def estimate(k: int) -> int:
                return self.load.get(k, 0) + self.unacked[k]
            assert estimate(key) <= min(estimate(k) for k in free) + 1
            self.unacked[key] += 1

    @precondition(lambda self: any(self.unacked.values()))
    @rule(data=st.data(), accepted=st.booleans())
    def ack(self, data: st.DataObject, accepted: bool) -> None:
        key = data.draw(st.sampled_from(sorted(k for k, n in self.unacked.items() if n)))
        self.unacked[key] -= 1
        self.rr.ack(key, accepted)

    @invariant()
    def at_most_window_unacked(self) -> None:
        for key in self.attached:
            assert 0 <= in_flight(self.rr, key) <= self.window
            assert in_flight(self.rr, key) == self.unacked[key]
        assert self.rr.workers == len(self.attached)


TestRoundRobinMachine = RoundRobinMachine.TestCase


def test_an_ack_of_several_rejoins_the_line_once() -> None:
    rr = RoundRobin(window=3)
    rr.attach(1)
    rr.attach(2)
    assert [rr.choose() for _ in range(6)] == [1, 2] * 3
    rr.ack(1, True, 3)  # one ack answering a hand-off of three
    rr.ack(2, True, 1)
    assert (in_flight(rr, 1), in_flight(rr, 2)) == (0, 2)
    # In line once each, 1 first: had 1 joined three times it would not give way to 2.
    assert [rr.choose() for _ in range(5)] == [1, 2, 1, 1, None]
    rr.ack(2, True, 1)
    rr.ack(2, True, 2)  # credit already free: 2 is in line and stays there once
    assert [rr.choose() for _ in range(4)] == [2, 2, 2, None]


def test_an_ack_of_more_than_were_handed_off_is_an_error() -> None:
    rr = RoundRobin(window=3)
    rr.attach(1)
    rr.choose()
    rr.choose()
    with pytest.raises(ValueError):
        rr.ack(1, True, 3)  # 1 free + 3 > 3
    assert in_flight(rr, 1) == 2  # nothing given back
    rr.ack(1, False, 2)
    assert in_flight(rr, 1) == 0


def test_hold_takes_every_free_slot_until_ack_gives_them_back() -> None:
    rr = RoundRobin(window=3)
    rr.attach(1)
    rr.attach(2)
    assert rr.choose() == 1
    assert rr.hold(1) == 2  # its two free slots
    assert in_flight(rr, 1) == 3
    assert [rr.choose() for _ in range(4)] == [2, 2, 2, None]  # 1 is never chosen
    assert rr.hold(1) == 0  # nothing left to take; not in line, no error
    assert rr.hold(2) == 0
    assert rr.hold(9) == 0  # not attached
    rr.ack(1, True, 3)  # the held slots and the hand-off's
    assert in_flight(rr, 1) == 0
    assert [rr.choose() for _ in range(4)] == [1, 1, 1, None]
    rr.detach(1)  # held or not, detach leaves the line consistent
    rr.ack(2, True, 1)
    assert rr.choose() == 2


def test_the_least_loaded_free_worker_goes_first() -> None:
    rr = RoundRobin(window=4)
    for key in (1, 2, 3):
        rr.attach(key)
    rr.report(1, 5)  # 1 said it holds five connections (CPU-bound work queued)
    rr.report(2, 1)
    # 2 (holding 1) is within one of 3 (0) and before it in line: turns between
    # them; 1 (5) waits while they hold two fewer.
    assert [rr.choose() for _ in range(8)] == [2, 3, 2, 3, 2, 3, 2, 3]
    assert in_flight(rr, 3) == 4 and in_flight(rr, 2) == 4  # both at their window
    assert rr.choose() == 1
    rr.detach(1)
    rr.report(1, 0)  # from a detached worker: ignored
    assert rr.choose() is None


def test_a_late_acker_catches_up_in_a_burst() -> None:
    """A worker that acks late was sent less, so it goes first once it acks: a burst comes out even."""
    rr = RoundRobin(window=2)
    for key in (1, 2):
        rr.attach(key)
    dealt = collections.Counter(rr.choose() for _ in range(4))
    assert dealt == {1: 2, 2: 2}
    for _ in range(3):  # 1 acks at once, again and again; 2 has not had a CPU yet
        rr.report(1, in_flight(rr, 1) + dealt[1])
        rr.ack(1, True, in_flight(rr, 1))
        key = rr.choose()
        assert key == 1
        dealt[key] += 1
    rr.report(2, 2)
    rr.ack(2, True, 2)  # 2 finally acks: it holds 2 against 1's 5
    assert [rr.choose(), rr.choose()] == [2, 2]
