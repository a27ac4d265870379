"""The master's figures at one moment: what ``ctl status``, ``ctl stats`` and ``/metrics`` show.

One snapshot is taken on the master's loop, between two callbacks, so its
numbers agree with each other. It is plain JSON-serialisable data (the
control socket sends it as is); its shape is the ``Snapshot`` typed dict,
which the control client, the metrics exporter and the benchmark lab read.
Per-worker counters are kept monotonic across restarts by each slot's
totals (``dispatcher.slots``); figures a process has not reported yet, or
that the kernel could not give, are None.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TypedDict

from dispatcher.listeners import Listener
from dispatcher.slots import Slots
from dispatcher.stats import DistributionFigures, ProcessSampler


class WorkerFigures(TypedDict):
    """One slot: its serving process's figures, its counters summed over its processes."""

    id: int
    pid: int | None
    state: str
    uptime_s: float
    restarts: int
    last_exit: str
    handed_off: int
    acked: int
    refused: int
    handled: int
    accepted: int
    active: int
    ping_rtt_ms: float | None
    ping_rtt_avg_ms: float | None
    loop_lag_ms: float | None
    rss_bytes: int | None
    uss_bytes: int | None
    cpu_percent: float | None
    open_fds: int | None


class DrainingFigures(TypedDict):
    """A retired process still finishing its connections."""

    id: int
    pid: int
    state: str
    uptime_s: float
    active: int


class MasterFigures(DistributionFigures):
    """The master's figures: what it is, and what its distribution counted."""

    pid: int
    version: str
    app: str
    policy: str
    window: int
    loop: str
    listening: list[str]
    uptime_s: float
    workers_wanted: int
    reloading: bool
    stopping: bool
    rss_bytes: int | None
    cpu_percent: float | None
    open_fds: int | None
    uss_bytes: int | None


class Snapshot(TypedDict):
    master: MasterFigures
    workers: list[WorkerFigures]
    draining: list[DrainingFigures]


class About(TypedDict):
    """What does not change while the master runs."""

    version: str
    app: str
    policy: str
    window: int
    loop: str


def take_snapshot(
    about: About,
    started: float,
    listeners: Sequence[Listener],
    slots: Slots,
    distribution: DistributionFigures,
    stopping: bool,
    reloading: bool,
    sampler: ProcessSampler,
) -> Snapshot:
    """Everything known about the master and each worker, now.

    Parameters:
        about: the master's fixed facts.
        started: when the master started (monotonic).
        slots: the worker slots (their processes, their counters).
        distribution: the distribution's counters (``Distribution.figures()``).
        stopping: the master's stop has begun.
        reloading: a rolling reload is under way.
        sampler: the master process's own psutil readings.
    """
    now = time.monotonic()
    workers: list[WorkerFigures] = []
    for slot in slots:
        worker = slot.worker
        counts = slots.counts(slot)
        entry: WorkerFigures = {
            "id": slot.id,
            "pid": worker.pid if worker else None,
            "state": slot.state.value,
            "uptime_s": round(now - worker.started, 3) if worker else 0.0,
            "restarts": slot.restarts,
            "last_exit": slot.last_exit,
            "handed_off": counts["handed_off"],
            "acked": counts["acked"],
            "refused": counts["refused"],
            "handled": counts["handled"],
            "accepted": counts["accepted"],
            "active": worker.pulse.figure("active") if worker else 0,
            "ping_rtt_ms": None,
            "ping_rtt_avg_ms": None,
            "loop_lag_ms": None,
            "rss_bytes": None,
            "uss_bytes": None,
            "cpu_percent": None,
            "open_fds": None,
        }
        if worker is not None:
            pulse = worker.pulse
            if pulse.rtt_last_s is not None and pulse.rtt_avg_s is not None:
                entry["ping_rtt_ms"] = round(pulse.rtt_last_s * 1000, 3)
                entry["ping_rtt_avg_ms"] = round(pulse.rtt_avg_s * 1000, 3)
            lag = pulse.reported.get("loop_lag_ms")
            entry["loop_lag_ms"] = lag if isinstance(lag, (int, float)) else None
            sample = worker.sampler.sample()
            entry["rss_bytes"] = sample.get("rss_bytes")
            entry["uss_bytes"] = sample.get("uss_bytes")
            entry["cpu_percent"] = sample.get("cpu_percent")
            entry["open_fds"] = sample.get("open_fds")
        workers.append(entry)
    draining: list[DrainingFigures] = [
        {"id": w.id, "pid": w.pid, "state": w.state.value, "uptime_s": round(now - w.started, 3),
         "active": w.pulse.figure("active")}
        for w in slots.retired.values()
    ]
    sample = sampler.sample()
    master: MasterFigures = {
        "pid": os.getpid(),
        "version": about["version"],
        "app": about["app"],
        "policy": about["policy"],
        "window": about["window"],
        "loop": about["loop"],
        "listening": [listener.address for listener in listeners],
        "uptime_s": round(now - started, 3),
        "workers_wanted": len(slots),
        "reloading": reloading,
        "stopping": stopping,
        **distribution,
        "rss_bytes": sample.get("rss_bytes"),
        "cpu_percent": sample.get("cpu_percent"),
        "open_fds": sample.get("open_fds"),
        "uss_bytes": sample.get("uss_bytes"),
    }
    return {"master": master, "workers": workers, "draining": draining}

