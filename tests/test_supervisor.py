"""The supervisor's decisions, without starting a process: ``spawn`` makes stand-ins.

Each test drives the events the master hears about a worker (its ready
message, its exit, a refusal, a timeout) and checks what the supervisor
decides: which state the process moves to, what the distribution is told,
what is started, signalled or stopped. Tests are named for the transition
they check, as Supervisor's are. The hand-off itself is not here: it is
tested with real processes and sockets (``test_scheduler``, the integration
tests).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dispatcher.config import Config
from dispatcher.health import Health, Pulse
from dispatcher.lifecycle import Life, WorkerState
from dispatcher.messages import Mailbox
from dispatcher.recycling import Recycling
from dispatcher.scheduler import Lane
from dispatcher.slots import Replaced, Slot
from dispatcher.supervisor import Supervisor
from dispatcher.worker_process import WorkerProcess
from shared.exitcodes import ExitCode
from shared.protocol import Drain, Error, Hello, Listen, Pong, Ready, UserMessage

S = WorkerState


class StandInChannel:
    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.closed = False
        self.backlog = 0

    def send(self, message: Any, fd: int | None = None) -> None:
        self.sent.append(message)

    def read_acks_of_dead_peer(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class StandInSampler:
    def __init__(self) -> None:
        self.rss_bytes: int | None = None

    def sample(self) -> dict[str, Any]:
        return {} if self.rss_bytes is None else {"rss_bytes": self.rss_bytes}


class StandIn(WorkerProcess):
    """A ``WorkerProcess`` with no process behind it: signals are recorded, the exit is the test's."""

    def __init__(self, worker_id: int, key: int, events: Any, max_requests: int) -> None:
        # Not WorkerProcess.__init__: there is no process, pidfd or socket to wire.
        self.id = worker_id
        self.key = key
        self.pid = 1000 + key
        self._events = events
        self.events = events
        self.max_requests = max_requests
        self.started = time.monotonic()
        self.returncode = None
        self.life = Life()
        self.lane = Lane()
        self.pulse = Pulse(last_heard=self.started)
        self.sampler = StandInSampler()  # type: ignore[assignment]
        self.channel = StandInChannel()  # type: ignore[assignment]
        self.signals: list[signal.Signals] = []

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.returncode is None:
            self.signals.append(sig)

    def reap(self) -> int:
        assert self.returncode is not None, "exit() it first"
        return self.returncode

    # What a test makes happen to it.

    def ready(self) -> None:
        self.events.on_message(self, Ready(), [])

    def exit(self, returncode: int) -> None:
        self.returncode = returncode
        self.events.on_exit(self)


class Distribution:
    """Records what the supervisor tells it."""

    def __init__(self) -> None:
        self.added: list[StandIn] = []
        self.attached: set[int] = set()
        self.removed: list[StandIn] = []
        self.forgotten: list[StandIn] = []
        self.loads: list[tuple[StandIn, int]] = []
        self.pending = 0
        self.requeue = 0
        self.refuse_add: Exception | None = None

    def add(self, worker: StandIn) -> None:
        if self.refuse_add is not None:
            raise self.refuse_add
        self.added.append(worker)
        self.attached.add(worker.key)

    def remove(self, worker: StandIn) -> bool:
        self.removed.append(worker)
        self.attached.discard(worker.key)
        return not self.attached

    def forget(self, worker: StandIn) -> int:
        self.forgotten.append(worker)
        return self.requeue

    def report_load(self, worker: StandIn, load: int) -> None:
        self.loads.append((worker, load))

    def figures(self) -> dict[str, int]:
        return {"pending": self.pending}


class Rig:
    def __init__(self, workers: int = 1, **settings: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.config = Config(app="a:b", workers=workers, **settings)
        self.distribution = Distribution()
        self.health = Health(self.config.ping_interval_s, self.config.ping_timeout_s)
        self.mailbox = Mailbox()
        self.spawned: list[StandIn] = []
        self.spawn_error: OSError | None = None
        self.fatal: list[ExitCode] = []
        self.recycling = Recycling(self.config.max_requests, 0, self.config.max_memory)
        self.supervisor = Supervisor(
            self.config, self.distribution, self.health, self.recycling,  # type: ignore[arg-type]
            self.mailbox, spawn=self.spawn, on_fatal=self.fatal.append,
        )
        self.supervisor.start(self.loop)

    def spawn(self, worker_id: int, key: int, events: Any, max_requests: int) -> Any:
        if self.spawn_error is not None:
            raise self.spawn_error
        worker = StandIn(worker_id, key, events, max_requests)
        self.spawned.append(worker)
        return worker

    def serving(self, slot_id: int = 0) -> StandIn:
        slot = self.supervisor.slots.get(slot_id)
        assert slot is not None and slot.worker is not None
        worker: StandIn = slot.worker  # type: ignore[assignment]
        return worker

    def run_until(self, done: Callable[[], bool], timeout: float = 5.0) -> None:
        """Run the loop (its timers and call_soon callbacks) until ``done()``."""
        async def waiter() -> None:
            while not done():
                await asyncio.sleep(0.005)

        self.loop.run_until_complete(asyncio.wait_for(waiter(), timeout))


@pytest.fixture
def rig() -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(workers: int = 1, **settings: Any) -> Rig:
        made = Rig(workers, **settings)
        rigs.append(made)
        return made

    yield make
    for made in rigs:
        made.loop.close()


def test_start_fills_every_slot_with_a_starting_process(rig: Callable[..., Rig]) -> None:
    r = rig(workers=3)
    assert [(w.id, w.state) for w in r.spawned] == [(0, S.STARTING), (1, S.STARTING), (2, S.STARTING)]
    assert len({w.key for w in r.spawned}) == 3
    assert r.distribution.added == []


def test_transition_starting_to_ready_gives_the_worker_to_the_distribution(rig: Callable[..., Rig]) -> None:
    r = rig(workers=2)
    first, second = r.spawned
    first.ready()
    assert first.state is S.READY and first.pulse.armed
    assert r.distribution.added == [first]
    assert not r.supervisor.all_ready()
    second.ready()
    assert r.supervisor.all_ready() and r.supervisor.changed.is_set()


def test_transition_ready_to_stopping_when_it_says_ready_twice(
    rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture,
) -> None:
    r = rig()
    worker = r.serving()
    worker.ready()
    worker.ready()
    assert worker.state is S.STOPPING and worker.signals == [signal.SIGKILL]
    assert r.distribution.removed == [worker]
    assert "worker 0 (pid 1001): sent ready twice; replacing it" in caplog.text


def test_transition_draining_stays_draining_when_ready_comes_after_a_drain(rig: Callable[..., Rig]) -> None:
    r = rig()
    worker = r.serving()
    r.supervisor.drain(worker)
    worker.ready()
    worker.ready()  # it was never ready: saying so again is no fault
    assert worker.state is S.DRAINING and worker.signals == []
    assert r.distribution.added == []
    assert worker.channel.sent == [Drain()]


def test_transition_ready_to_exited_soon_after_ready_restarts_the_slot_after_its_backoff(
    rig: Callable[..., Rig],
) -> None:
    r = rig()
    worker = r.serving()
    worker.ready()  # and dies at once by itself: a crash loop's first step
    worker.exit(-signal.SIGSEGV)
    slot = r.supervisor.slots.get(0)
    assert slot is not None and slot.worker is None
    assert worker.state is S.EXITED and r.distribution.forgotten == [worker]
    assert worker.channel.closed
    assert slot.state is S.BACKOFF and slot.restarts == 1
    assert slot.last_exit == "killed by SIGSEGV"
    assert slot.restart_timer is not None
    assert slot.restart_timer.when() - r.loop.time() == pytest.approx(0.1, abs=0.05)
    r.run_until(lambda: len(r.spawned) == 2)
    replacement = r.spawned[1]
    assert (replacement.id, replacement.state) == (0, S.STARTING) and replacement.key != worker.key
    assert slot.worker is replacement and slot.restart_timer is None


def _served(worker: StandIn, seconds: float = 1.0) -> None:
    """As if ``worker`` had been ready for ``seconds``."""
    worker.ready()
    assert worker.life.ready_at is not None
    worker.life.ready_at -= seconds


def test_transition_ready_to_exited_after_serving_restarts_the_slot_at_once(
    rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    r = rig(workers=2)
    first = r.serving(0)
    for _ in range(20):  # however often
        _served(first)
        first.exit(1)
        slot = r.supervisor.slots.get(0)
        assert slot is not None and slot.restart_timer is None
        assert slot.worker is r.spawned[-1] and slot.worker is not first
        first = r.serving(0)
    assert slot.restarts == 20 and slot.backoff.crashes == 0
    assert "worker 0 restarts at once (it served 1.0 s)" in caplog.text


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_transition_starting_to_exited_by_a_kill_from_outside_restarts_at_once(
    rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture, sig: signal.Signals,
) -> None:
    """Killed before it was ready, by an operator or a chaos test: its code did not fail."""
    caplog.set_level(logging.INFO)
    r = rig()
    for _ in range(5):
        r.serving().exit(-sig)
    slot = r.supervisor.slots.get(0)
    assert slot is not None and slot.restart_timer is None and slot.backoff.crashes == 0
    assert len(r.spawned) == 6
    assert "worker 0 restarts at once (killed from outside)" in caplog.text


def test_a_kill_by_the_master_before_ready_counts_as_a_crash(rig: Callable[..., Rig]) -> None:
    r = rig(workers=2, boot_timeout_s=1.0)
    worker = r.serving()
    r.serving(1).ready()  # another serves, so a failed boot does not stop the master
    r.supervisor.check_boot(time.monotonic() + 2.0)  # not ready in time: the master kills it
    assert worker.signals == [signal.SIGKILL]
    worker.exit(-signal.SIGKILL)
    slot = r.supervisor.slots.get(0)
    assert slot is not None and slot.restart_timer is not None and slot.backoff.crashes == 1


def test_crash_loop_backoff_is_per_slot_and_a_served_life_starts_it_over(rig: Callable[..., Rig]) -> None:
    r = rig(workers=2)
    slot = r.supervisor.slots.get(0)
    assert slot is not None
    for _ in range(3):
        r.serving(0).exit(1)  # never ready: a crash
        assert slot.restart_timer is not None
        r.run_until(lambda: slot.worker is not None)
    assert slot.backoff.crashes == 3
    other = r.supervisor.slots.get(1)
    assert other is not None and other.backoff.crashes == 0
    _served(r.serving(0))
    r.serving(0).exit(-signal.SIGKILL)
    assert slot.backoff.crashes == 0 and slot.restart_timer is None and slot.worker is not None


def test_transition_starting_to_exited_when_the_app_cannot_load_stops_the_master(
    rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture,
) -> None:
    r = rig(workers=2)
    first, second = r.spawned
    r.supervisor.on_message(first, _error(ExitCode.APP_LOAD_FAILED, "app spec 'a:b': no module"), [])
    first.exit(ExitCode.APP_LOAD_FAILED)
    second.exit(ExitCode.APP_LOAD_FAILED)
    assert r.fatal == [ExitCode.APP_LOAD_FAILED]  # once, however many fail
    assert caplog.text.count("cannot load app: app spec 'a:b': no module") == 1
    slot = r.supervisor.slots.get(0)
    assert slot is not None and slot.restart_timer is None


def test_transition_starting_to_exited_while_another_serves_restarts_instead_of_stopping(
    rig: Callable[..., Rig],
) -> None:
    r = rig(workers=2)
    first, second = r.spawned
    first.ready()
    second.exit(ExitCode.APP_LOAD_FAILED)  # a new import error, say, while 0 serves the old code
    assert r.fatal == []
    slot = r.supervisor.slots.get(1)
    assert slot is not None and slot.state is S.BACKOFF


def test_transition_starting_to_stopping_on_boot_timeout_counts_as_a_failed_boot(
    rig: Callable[..., Rig],
) -> None:
    r = rig(boot_timeout_s=5.0)
    worker = r.serving()
    r.supervisor.check_boot(worker.started + 1.0)
    assert worker.state is S.STARTING
    r.supervisor.check_boot(worker.started + 6.0)
    r.supervisor.check_boot(worker.started + 7.0)  # once
    assert worker.state is S.STOPPING and worker.signals == [signal.SIGKILL]
    assert worker.life.boot_timed_out
    worker.exit(-signal.SIGKILL)
    assert r.fatal == [ExitCode.WORKER_BOOT_FAILED]


def test_transition_ready_to_stopping_when_unresponsive(
    rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture,
) -> None:
    r = rig(ping_interval_s=1.0, ping_timeout_s=2.0)
    worker = r.serving()
    worker.ready()
    r.supervisor.ping()
    assert worker.channel.sent[-1].__class__.__name__ == "Ping" and worker.signals == []
    worker.pulse.last_heard -= 3.0  # silent for 3 s
    r.supervisor.ping()
    r.supervisor.ping()  # reported once
    assert worker.state is S.STOPPING and worker.signals == [signal.SIGTERM]
    assert r.distribution.removed == [worker]
    assert caplog.text.count("is unresponsive: no pong for") == 1
    r.run_until(lambda: worker.signals == [signal.SIGTERM, signal.SIGKILL])


def test_transition_ready_to_draining_on_a_refusal_starts_the_slot_afresh_at_once(
    rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture,
) -> None:
    r = rig(graceful_timeout_s=0.2)
    worker = r.serving()
    _served(worker)
    r.supervisor.on_refusal(worker)  # it began draining by itself
    r.supervisor.on_refusal(worker)
    assert worker.state is S.DRAINING
    assert caplog.text.count("drains by itself (it refused a hand-off)") == 1
    slot = r.supervisor.slots.get(0)
    assert slot is not None
    assert len(r.spawned) == 2 and slot.worker is r.spawned[1]  # capacity is back as soon as it boots
    assert r.supervisor.slots.retired == {worker.key: worker}
    # Bounded by the graceful timeout, like any retired worker.
    r.run_until(lambda: worker.signals == [signal.SIGKILL])
    worker.exit(-signal.SIGKILL)
    assert len(r.spawned) == 2 and slot.worker is r.spawned[1]


def test_a_worker_that_drains_as_soon_as_it_is_ready_is_restarted_after_the_backoff(
    rig: Callable[..., Rig],
) -> None:
    """A custom server that returns at once, again and again, is a loop like a crash loop."""
    r = rig()
    worker = r.serving()
    worker.ready()
    r.supervisor.on_refusal(worker)
    slot = r.supervisor.slots.get(0)
    assert slot is not None and slot.restart_timer is not None and slot.backoff.crashes == 1
    r.run_until(lambda: len(r.spawned) == 2)


def test_a_pong_saying_draining_retires_the_worker_under_any_policy(rig: Callable[..., Rig]) -> None:
    """Under shared and reuseport a worker is sent nothing, so no refusal would ever tell."""
    r = rig()
    worker = r.serving()
    _served(worker)
    r.supervisor.on_message(worker, Pong(1, {"draining": False}), [])
    assert len(r.spawned) == 1 and worker.state is S.READY
    r.supervisor.on_message(worker, Pong(2, {"draining": True}), [])
    assert worker.state is S.DRAINING and r.supervisor.slots.retired == {worker.key: worker}
    assert len(r.spawned) == 2
    r.supervisor.on_message(worker, Pong(3, {"draining": True}), [])  # said again: nothing more
    assert len(r.spawned) == 2


def test_a_refusal_after_being_told_to_drain_starts_nothing(rig: Callable[..., Rig]) -> None:
    r = rig()
    worker = r.serving()
    worker.ready()
    r.supervisor.drain(worker)
    r.supervisor.on_refusal(worker)
    assert len(r.spawned) == 1 and worker.state is S.DRAINING


def test_a_refusal_from_a_worker_being_replaced_leaves_the_slot_to_its_successor(
    rig: Callable[..., Rig],
) -> None:
    r = rig()
    worker = r.serving()
    worker.ready()
    slot = r.supervisor.slots.get(0)
    assert slot is not None
    replaced = r.supervisor.replace(slot, "reload")
    successor = r.spawned[1]
    r.supervisor.on_refusal(worker)
    assert len(r.spawned) == 2 and slot.worker is None and slot.successor is successor
    successor.ready()
    assert slot.worker is successor and replaced.done() and replaced.result() is None


def test_stopping_is_idempotent(rig: Callable[..., Rig]) -> None:
    r = rig()
    worker = r.serving()
    worker.ready()
    r.supervisor.signal_all(signal.SIGTERM)
    r.supervisor.signal_all(signal.SIGKILL)
    r.supervisor.kill(worker, "a fault")
    r.supervisor.drain(worker)  # draining a stopping worker changes nothing
    assert worker.state is S.STOPPING
    assert worker.signals == [signal.SIGTERM, signal.SIGKILL, signal.SIGKILL]
    worker.exit(-signal.SIGKILL)
    r.supervisor.kill(worker, "too late")  # exited: nothing
    r.supervisor.signal_all(signal.SIGKILL)
    assert worker.state is S.EXITED and worker.signals == [signal.SIGTERM, signal.SIGKILL, signal.SIGKILL]


def replacing(r: Rig) -> tuple[StandIn, StandIn, Slot, Replaced]:
    """Slot 0's ready worker, the successor ``replace`` started for it, the slot, and the future."""
    old = r.serving()
    old.ready()
    slot = r.supervisor.slots.get(0)
    assert slot is not None
    replaced = r.supervisor.replace(slot, "reload")
    return old, r.spawned[-1], slot, replaced


def test_transition_successor_ready_takes_over_and_the_old_one_drains(rig: Callable[..., Rig]) -> None:
    r = rig()
    old, successor, slot, replaced = replacing(r)
    assert r.supervisor.replace(slot, "reload") is replaced  # one at a time
    assert slot.successor is successor and slot.worker is old
    successor.ready()
    assert slot.worker is successor and slot.successor is None
    assert r.distribution.added == [old, successor]
    assert old.state is S.DRAINING and old.channel.sent == [Drain()] and old.key in r.supervisor.slots.retired
    assert replaced.done() and replaced.result() is None
    old.exit(0)
    assert slot.worker is successor and slot.restart_timer is None  # a retired exit restarts nothing
    assert old.key not in r.supervisor.slots.retired


def test_transition_successor_exited_before_ready_keeps_the_old_one_serving(rig: Callable[..., Rig]) -> None:
    r = rig()
    old, successor, slot, replaced = replacing(r)
    r.supervisor.on_message(successor, _error(ExitCode.APP_LOAD_FAILED, "bad code on disk"), [])
    successor.exit(ExitCode.APP_LOAD_FAILED)
    assert replaced.result() == "worker 0 failed to boot: bad code on disk"
    assert slot.worker is old and old.state is S.READY and slot.successor is None
    assert slot.restart_timer is None and r.fatal == []


def test_transition_ready_to_draining_of_a_removed_slot_restarts_nothing(rig: Callable[..., Rig]) -> None:
    r = rig(workers=3)
    for worker in r.spawned:
        worker.ready()
    assert r.supervisor.scale(1) == (0, 2)
    assert [slot.id for slot in r.supervisor.slots] == [0]
    gone = r.spawned[1:]
    assert [w.state for w in gone] == [S.DRAINING, S.DRAINING]
    for worker in gone:
        worker.exit(0)
    assert len(r.spawned) == 3 and r.supervisor.slots.retired == {}
    assert r.supervisor.scale(2) == (1, 0)
    assert r.spawned[3].id == 1  # the lowest free id


def test_spawn_failure_retries_after_the_backoff(rig: Callable[..., Rig]) -> None:
    r = rig()
    worker = r.serving()
    r.spawn_error = OSError(24, "Too many open files")
    worker.exit(-signal.SIGKILL)
    slot = r.supervisor.slots.get(0)
    assert slot is not None
    r.run_until(lambda: slot.restarts == 2)  # tried, failed, waits again
    assert slot.last_exit == "spawn failed: [Errno 24] Too many open files"
    r.spawn_error = None
    r.run_until(lambda: slot.worker is not None)


def test_an_exit_with_nobody_left_says_how_many_connections_wait(
    rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture,
) -> None:
    r = rig()
    worker = r.serving()
    worker.ready()
    r.distribution.requeue = 3
    r.distribution.pending = 5
    worker.exit(-signal.SIGKILL)
    assert "3 un-acked connection(s) re-dispatched" in caplog.text
    assert "no worker is ready: 5 connection(s) wait (up to 30 s) for a restart" in caplog.text
    r.serving().exit(-signal.SIGKILL)  # its replacement dies before it is ready: the same connections
    assert caplog.text.count("no worker is ready") == 1
    r.serving().ready()
    r.serving().exit(-signal.SIGKILL)
    assert caplog.text.count("no worker is ready") == 2  # once more after a worker was ready again


def test_a_successor_whose_channel_fails_while_given_sockets_takes_over_nothing(
    rig: Callable[..., Rig],
) -> None:
    r = rig()
    old, successor, slot, replaced = replacing(r)

    def add_and_fail(worker: StandIn) -> None:
        # As a Listen send that meets a broken channel: the channel closes at once.
        worker.channel.closed = True
        r.supervisor.on_channel_closed(worker, "write error: [Errno 9] Bad file descriptor")

    r.distribution.add = add_and_fail  # type: ignore[method-assign]
    successor.ready()
    assert slot.worker is old and old.state is S.READY and old.key not in r.supervisor.slots.retired
    assert successor.state is S.STOPPING and not replaced.done()
    successor.exit(-signal.SIGKILL)
    assert replaced.result() == "worker 0 failed to boot: killed by SIGKILL"


def test_ready_waiters_are_woken_by_a_scale_and_by_the_stop(rig: Callable[..., Rig]) -> None:
    r = rig(workers=2)
    first, _ = r.spawned
    first.ready()
    r.supervisor.changed.clear()
    r.supervisor.scale(1)  # the one left is ready: all are
    assert r.supervisor.changed.is_set() and r.supervisor.all_ready()
    r.supervisor.changed.clear()
    r.supervisor.stop_restarts()
    assert r.supervisor.changed.is_set() and not r.supervisor.all_ready()


def test_a_worker_that_cannot_be_given_sockets_is_replaced(rig: Callable[..., Rig]) -> None:
    r = rig(policy="shared")
    worker = r.serving()
    r.distribution.refuse_add = OSError(24, "Too many open files")
    worker.ready()
    assert worker.state is S.STOPPING and worker.signals == [signal.SIGKILL]


def test_a_worker_past_max_requests_is_replaced_new_one_first(rig: Callable[..., Rig]) -> None:
    r = rig(max_requests=10)
    worker = r.serving()
    assert worker.max_requests == 10
    worker.ready()
    worker.lane.acked = 10
    r.supervisor.on_max_requests(worker)
    r.run_until(lambda: len(r.spawned) == 2)
    slot = r.supervisor.slots.get(0)
    assert slot is not None and slot.successor is r.spawned[1] and slot.replacing.startswith("served 10")
    assert worker.state is S.READY  # serving until the new one is ready


def test_pongs_refresh_health_and_the_load_figure(rig: Callable[..., Rig]) -> None:
    r = rig()
    worker = r.serving()
    worker.ready()
    stats = {"active": 4, "handled": 7, "bogus": 1, "handed_off": 9, "acked": 9, "refused": 0}
    r.supervisor.on_message(worker, Pong(1, stats), [])
    # Only what the master uses is kept: its own counts of hand-offs are the lane's.
    assert worker.pulse.reported == {"active": 4, "handled": 7}
    assert r.distribution.loads == [(worker, 4)]


def test_user_messages_reach_every_handler_even_if_one_fails(rig: Callable[..., Rig]) -> None:
    r = rig()
    worker = r.serving()
    got: list[tuple[int, Any]] = []

    def broken(worker_id: int, payload: Any) -> None:
        raise RuntimeError("handler bug")

    r.mailbox.handlers += [broken, lambda worker_id, payload: got.append((worker_id, payload))]
    r.supervisor.on_message(worker, UserMessage({"n": 1}), [])
    assert got == [(0, {"n": 1})]


def test_a_message_only_the_master_sends_gets_the_worker_replaced(rig: Callable[..., Rig]) -> None:
    r = rig()
    worker = r.serving()
    read_end, write_end = os.pipe()
    r.supervisor.on_message(worker, Listen(), [write_end])  # with the fd a Listen carries
    assert os.read(read_end, 1) == b""  # the master closed it: its only write end is gone
    os.close(read_end)
    r.supervisor.on_message(worker, Hello(0, worker.pid), [])  # the right hello: fine
    assert worker.state is S.STOPPING and worker.signals == [signal.SIGKILL]


def test_once_stopping_nothing_is_restarted_or_replaced(rig: Callable[..., Rig]) -> None:
    r = rig()
    worker = r.serving()
    worker.ready()
    r.supervisor.stop_restarts()
    slot = r.supervisor.slots.get(0)
    assert slot is not None
    assert r.supervisor.replace(slot, "reload").result() == "the master is stopping"
    worker.exit(0)
    assert slot.restart_timer is None and len(r.spawned) == 1
    with pytest.raises(ValueError, match="stopping"):
        r.supervisor.scale(2)


def _error(code: ExitCode, text: str) -> Error:
    return Error(int(code), text)
