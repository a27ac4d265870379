"""The policies that choose a worker: round-robin's FIFO and window, as examples and as properties.

Every example runs on each implementation this machine has (the pure-Python
reference and the compiled copy the master uses), and a state machine drives
both with the same calls and requires the same answers.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dispatcher.policies import Policy, RoundRobin, round_robin
from dispatcher.policies.round_robin import PyRoundRobin
from shared import hotpath

#: (name, class): every round-robin this machine has.
IMPLEMENTATIONS: list[tuple[str, Callable[..., RoundRobin]]] = [("python", PyRoundRobin)]
if round_robin.COMPILED:
    IMPLEMENTATIONS.append(("compiled", RoundRobin))


@pytest.fixture(params=[cls for _, cls in IMPLEMENTATIONS], ids=[name for name, _ in IMPLEMENTATIONS])
def make(request: pytest.FixtureRequest) -> Callable[..., RoundRobin]:
    cls: Callable[..., RoundRobin] = request.param
    return cls


@pytest.mark.skipif(os.environ.get(hotpath.PURE_PYTHON_ENV) == "1", reason="pure Python asked for")
def test_compiled_is_built() -> None:
    # The install builds it (make setup installs the compiler); without it the
    # master counts every connection in Python.
    assert round_robin.COMPILED
    assert RoundRobin is not PyRoundRobin
    assert isinstance(RoundRobin(), Policy) and RoundRobin.name == PyRoundRobin.name == "round-robin"


def test_pure_python_on_request() -> None:
    code = ("from dispatcher.policies import round_robin as r; "
            "print(r.COMPILED, r.RoundRobin is r.PyRoundRobin)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, hotpath.PURE_PYTHON_ENV: "1"},
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.split() == ["False", "True"]


def test_both_have_the_same_calls() -> None:
    def public(policy: object) -> set[str]:
        return {name for name in dir(policy) if not name.startswith("_")}
    assert public(RoundRobin(2)) == public(PyRoundRobin(2))


def test_a_window_below_one_is_refused(make: Callable[..., RoundRobin]) -> None:
    for window in (0, -1):
        with pytest.raises(ValueError):
            make(window)


def test_oldest_free_worker_gets_the_next_connection(make: Callable[..., RoundRobin]) -> None:
    rr = make()
    for key in (1, 2, 3):
        rr.attach(key)
    assert [rr.choose() for _ in range(3)] == [1, 2, 3]
    assert rr.choose() is None  # window 1: everyone holds one un-acked hand-off
    rr.ack(2, True)
    rr.ack(1, True)
    assert [rr.choose(), rr.choose(), rr.choose()] == [2, 1, None]


def test_window_bounds_unacked_handoffs(make: Callable[..., RoundRobin]) -> None:
    rr = make(window=3)
    rr.attach(1)
    assert [rr.choose() for _ in range(4)] == [1, 1, 1, None]
    assert rr.in_flight(1) == 3


def test_a_burst_is_dealt_in_turn_whatever_the_window(make: Callable[..., RoundRobin]) -> None:
    rr = make(window=3)
    for key in (1, 2, 3):
        rr.attach(key)
    assert [rr.choose() for _ in range(10)] == [1, 2, 3] * 3 + [None]
    rr.ack(2, True)
    rr.ack(1, True)
    assert [rr.choose(), rr.choose(), rr.choose()] == [2, 1, None]


def test_a_detached_worker_is_never_chosen(make: Callable[..., RoundRobin]) -> None:
    rr = make()
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


def test_more_acks_than_handoffs_is_an_error(make: Callable[..., RoundRobin]) -> None:
    rr = make()
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
            assert 0 <= self.rr.in_flight(key) <= self.window
            assert self.rr.in_flight(key) == self.unacked[key]
        assert self.rr.workers == len(self.attached)


TestRoundRobinMachine = RoundRobinMachine.TestCase


def test_an_ack_of_several_rejoins_the_line_once(make: Callable[..., RoundRobin]) -> None:
    rr = make(window=3)
    rr.attach(1)
    rr.attach(2)
    assert [rr.choose() for _ in range(6)] == [1, 2] * 3
    rr.ack(1, True, 3)  # one ack answering a hand-off of three
    rr.ack(2, True, 1)
    assert (rr.in_flight(1), rr.in_flight(2)) == (0, 2)
    # In line once each, 1 first: had 1 joined three times it would not give way to 2.
    assert [rr.choose() for _ in range(5)] == [1, 2, 1, 1, None]
    rr.ack(2, True, 1)
    rr.ack(2, True, 2)  # credit already free: 2 is in line and stays there once
    assert [rr.choose() for _ in range(4)] == [2, 2, 2, None]


def test_an_ack_of_more_than_were_handed_off_is_an_error(make: Callable[..., RoundRobin]) -> None:
    rr = make(window=3)
    rr.attach(1)
    rr.choose()
    rr.choose()
    with pytest.raises(ValueError):
        rr.ack(1, True, 3)  # 1 free + 3 > 3
    assert rr.in_flight(1) == 2  # nothing given back
    rr.ack(1, False, 2)
    assert rr.in_flight(1) == 0


def test_hold_takes_every_free_slot_until_ack_gives_them_back(make: Callable[..., RoundRobin]) -> None:
    rr = make(window=3)
    rr.attach(1)
    rr.attach(2)
    assert rr.choose() == 1
    assert rr.hold(1) == 2  # its two free slots
    assert rr.in_flight(1) == 3
    assert [rr.choose() for _ in range(4)] == [2, 2, 2, None]  # 1 is never chosen
    assert rr.hold(1) == 0  # nothing left to take; not in line, no error
    assert rr.hold(2) == 0
    assert rr.hold(9) == 0  # not attached
    rr.ack(1, True, 3)  # the held slots and the hand-off's
    assert rr.in_flight(1) == 0
    assert [rr.choose() for _ in range(4)] == [1, 1, 1, None]
    rr.detach(1)  # held or not, detach leaves the line consistent
    rr.ack(2, True, 1)
    assert rr.choose() == 2


def test_the_least_loaded_free_worker_goes_first(make: Callable[..., RoundRobin]) -> None:
    rr = make(window=4)
    for key in (1, 2, 3):
        rr.attach(key)
    rr.report(1, 5)  # 1 said it holds five connections (CPU-bound work queued)
    rr.report(2, 1)
    # 2 (holding 1) is within one of 3 (0) and before it in line: turns between
    # them; 1 (5) waits while they hold two fewer.
    assert [rr.choose() for _ in range(8)] == [2, 3, 2, 3, 2, 3, 2, 3]
    assert rr.in_flight(3) == 4 and rr.in_flight(2) == 4  # both at their window
    assert rr.choose() == 1
    rr.detach(1)
    rr.report(1, 0)  # from a detached worker: ignored
    assert rr.choose() is None


def test_a_late_acker_catches_up_in_a_burst(make: Callable[..., RoundRobin]) -> None:
    """A worker that acks late was sent less, so it goes first once it acks: a burst comes out even."""
    rr = make(window=2)
    for key in (1, 2):
        rr.attach(key)
    dealt = collections.Counter(rr.choose() for _ in range(4))
    assert dealt == {1: 2, 2: 2}
    for _ in range(3):  # 1 acks at once, again and again; 2 has not had a CPU yet
        rr.report(1, rr.in_flight(1) + dealt[1])
        rr.ack(1, True, rr.in_flight(1))
        key = rr.choose()
        assert key == 1
        dealt[key] += 1
    rr.report(2, 2)
    rr.ack(2, True, 2)  # 2 finally acks: it holds 2 against 1's 5
    assert [rr.choose(), rr.choose()] == [2, 2]


def test_deal_is_choose_for_each_in_turn(make: Callable[..., RoundRobin]) -> None:
    dealer, chooser = make(window=3), make(window=3)
    for rr in (dealer, chooser):
        for key in (1, 2, 3):
            rr.attach(key)
        rr.report(2, 4)  # 2 holds more: it waits its turn
    conns = [f"conn {i}" for i in range(11)]
    groups, dealt = dealer.deal(conns)
    chosen = [chooser.choose() for _ in conns]
    assert dealt == 9 and chosen[9:] == [None, None]  # three slots each, then none is free
    # Each worker's connections in order, workers in the order first chosen.
    expected: dict[int, list[str]] = {}
    for conn, key in zip(conns[:dealt], chosen[:dealt], strict=True):
        assert key is not None
        expected.setdefault(key, []).append(conn)
    assert groups == list(expected.items())
    assert dealer.deal(["more"]) == ([], 0)
    assert [dealer.in_flight(k) for k in (1, 2, 3)] == [3, 3, 3]


def test_an_empty_deal_changes_nothing(make: Callable[..., RoundRobin]) -> None:
    rr = make(window=2)
    assert rr.deal([]) == ([], 0)
    rr.attach(1)
    assert rr.deal([]) == ([], 0)
    assert rr.in_flight(1) == 0
    with pytest.raises(KeyError):
        rr.in_flight(2)  # not attached


def _outcome(call: Callable[[], object]) -> object:
    """What a call returned, or the type of what it raised."""
    try:
        return ("returned", call())
    except (ValueError, KeyError) as exc:
        return ("raised", type(exc))


class SameAnswersMachine(RuleBasedStateMachine):
    """The compiled round-robin answers every call as the pure-Python one does, errors included."""

    keys = st.integers(0, 6)

    def __init__(self) -> None:
        super().__init__()
        self.window = 3
        self.both = [cls(self.window) for _, cls in IMPLEMENTATIONS]

    def same(self, call: Callable[[RoundRobin], object]) -> None:
        answers = [_outcome(lambda rr=rr: call(rr)) for rr in self.both]
        assert all(answer == answers[0] for answer in answers), answers

    @rule(key=keys)
    def attach(self, key: int) -> None:
        self.same(lambda rr: rr.attach(key))

    @rule(key=keys)
    def detach(self, key: int) -> None:
        self.same(lambda rr: rr.detach(key))

    @rule(key=keys, load=st.integers(0, 8))
    def report(self, key: int, load: int) -> None:
        self.same(lambda rr: rr.report(key, load))

    @rule()
    def choose(self) -> None:
        self.same(lambda rr: rr.choose())

    @rule(count=st.integers(0, 12))
    def deal(self, count: int) -> None:
        self.same(lambda rr: rr.deal(list(range(count))))

    @rule(key=keys, accepted=st.booleans(), count=st.integers(0, 4))
    def ack(self, key: int, accepted: bool, count: int) -> None:
        self.same(lambda rr: rr.ack(key, accepted, count))

    @rule(key=keys)
    def hold(self, key: int) -> None:
        self.same(lambda rr: rr.hold(key))

    @invariant()
    def same_counts(self) -> None:
        self.same(lambda rr: (rr.workers, rr.window,
                              [_outcome(lambda k=k: rr.in_flight(k)) for k in range(7)]))


TestSameAnswers = SameAnswersMachine.TestCase
TestSameAnswers.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
