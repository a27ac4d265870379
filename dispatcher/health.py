"""Health pings: is each worker's event loop still answering?

The master pings every live worker on one timer, all at once, and never
waits for an answer: a pong is just another message on the worker's
channel. The worker answers from its event loop (not a helper thread), so a
loop blocked by the app stops answering and is caught here. One ping is
outstanding per worker at a time; a worker silent for longer than the
timeout (counted from its last pong, or from when it became ready) is
reported once, as the return value of ``tick``: what to do about it is the
supervisor's decision.

Each worker's ``pulse`` is this module's own record of it; nothing else
writes it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from shared.channel import Channel
from shared.protocol import Ping, Pong

# What a pong may report, and as what.
_REPORTED: dict[str, tuple[type, ...]] = {
    "handled": (int,), "accepted": (int,), "active": (int,), "loop_lag_ms": (int, float),
    "draining": (bool,),
}
_LIMIT = 2**63


@dataclass
class Pulse:
    """What the master hears from one worker's pongs.

    Attributes:
        armed: pinged from now on (it is ready; a worker loading its app has a
            blocked loop by design, and the boot timeout covers it).
        last_heard: when it last answered (or became ready), monotonic.
        reported: the counters of its last pong the master uses, checked.
    """

    armed: bool = False
    last_heard: float = 0.0
    seq: int = 0
    sent_at: float | None = None
    rtt_last_s: float | None = None
    rtt_total_s: float = 0.0
    pongs: int = 0
    reported: dict[str, Any] = field(default_factory=dict)
    unresponsive: bool = False

    @property
    def rtt_avg_s(self) -> float | None:
        return self.rtt_total_s / self.pongs if self.pongs else None

    def figure(self, key: str) -> int:
        """A reported counter (``handled``, ``accepted``, ``active``), 0 until reported."""
        return int(self.reported.get(key, 0))

    @property
    def draining(self) -> bool:
        """Its last pong said it is draining."""
        return bool(self.reported.get("draining", False))


class Pinged(Protocol):
    """What health needs of a worker."""

    pulse: Pulse
    channel: Channel
    returncode: int | None


_Worker = TypeVar("_Worker", bound=Pinged)


class Health:
    """Ping bookkeeping for the master's workers.

    Parameters:
        interval_s: how often to ping (0: never).
        timeout_s: how long a ready worker may stay silent.
    """

    def __init__(self, interval_s: float, timeout_s: float) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s

    @staticmethod
    def arm(worker: Pinged, now: float | None = None) -> None:
        """``worker`` is ready: the ping timeout counts from now."""
        worker.pulse.armed = True
        worker.pulse.last_heard = time.monotonic() if now is None else now

    def tick(self, workers: Iterable[_Worker], now: float | None = None) -> list[tuple[_Worker, float]]:
        """Ping who needs it; return each worker newly found silent too long, with for how long."""
        now = time.monotonic() if now is None else now
        silent_ones = []
        for worker in workers:
            pulse = worker.pulse
            if not pulse.armed or worker.returncode is not None or worker.channel.closed:
                continue
            silent = now - pulse.last_heard
            if silent > self.timeout_s:
                if not pulse.unresponsive:
                    pulse.unresponsive = True
                    silent_ones.append((worker, silent))
                continue
            if pulse.sent_at is None:
                pulse.seq += 1
                pulse.sent_at = now
                worker.channel.send(Ping(pulse.seq))
        return silent_ones

    @staticmethod
    def on_pong(worker: Pinged, pong: Pong, now: float | None = None) -> None:
        """Record ``worker``'s answer: round trip and its own counters.

        Only the counters the master uses are kept, and only as non-negative
        numbers: the figures come from the worker and are not trusted.
        """
        now = time.monotonic() if now is None else now
        pulse = worker.pulse
        pulse.last_heard = now
        pulse.reported = {
            key: value for key, value in pong.stats.items()
            if key in _REPORTED and type(value) in _REPORTED[key] and 0 <= value < _LIMIT
        }
        if pulse.sent_at is not None and pong.seq == pulse.seq:
            rtt = now - pulse.sent_at
            pulse.rtt_last_s = rtt
            pulse.rtt_total_s += rtt
            pulse.pongs += 1
            pulse.sent_at = None
