"""Workers SIGKILLed under load: a random ready worker every 200 ms while clients keep coming.

What a killed worker had acked is lost with it (the client sees a reset or
an empty answer); what it had not acked is re-dispatched. No request may
time out or get part of an answer, and capacity must come back: no worker
ready in at most 5 % of the samples, and all of them ready again within 2 s
of the last kill.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass

from bench.load import Load
from bench.server import Server
from tests.apps.chaos import ANSWER
from tests.chaos.support import Recorder, Sampler, Targets, full_and_short, kill_random, ready_pids, seconds

APP = "tests.apps.chaos:handler"
#: Both targets wait on this.
RESTART_AT_ONCE = "a worker that served restarted at once, without the crash backoff"


@dataclass(frozen=True)
class Size:
    workers: int
    clients: int
    kill_every_s: float
    for_s: float
    sample_every_s: float = 0.1
    #: How long to wait for every worker to be ready again after the last kill.
    back_within_s: float = 30.0


FULL = Size(workers=4, clients=4, kill_every_s=0.2, for_s=20.0)
SHORT = Size(workers=4, clients=3, kill_every_s=0.2, for_s=3.0)


@full_and_short(FULL, SHORT, timeout_s=150)
def test_sigkill_a_random_worker_every_200_ms_under_load(server_factory: type[Server], record: Recorder,
                                                         size: Size) -> None:
    server = server_factory("--app", APP, workers=size.workers).start()
    redispatched_before = server.status()["master"]["redispatched"]
    rng = random.Random()
    kills = 0
    sampler = Sampler(lambda: ready_pids(server), size.sample_every_s, size.for_s + size.back_within_s + 30)
    load = Load(server.port, clients=size.clients, expect=re.compile(ANSWER), max_seconds=size.for_s + 60)
    with load, sampler.running():
        load.wait_requests(50)
        started = last_kill = time.monotonic()
        last_killed = 0
        for tick in range(round(size.for_s / size.kill_every_s)):
            pids = ready_pids(server)
            killed = kill_random(pids, rng) if pids else None
            if killed is not None:
                kills += 1
                last_kill, last_killed = time.monotonic(), killed
            # Pacing, not synchronisation: the next kill is due a fixed interval after the first.
            time.sleep(max(0.0, started + (tick + 1) * size.kill_every_s - time.monotonic()))
        ended = time.monotonic()
        back_at: float | None = None
        while time.monotonic() - last_kill < size.back_within_s:
            pids = ready_pids(server)
            if pids is not None and len(pids) == size.workers and last_killed not in pids:
                back_at = time.monotonic()
                break
            time.sleep(0.02)  # another process's state: looked at again, bounded
        load.wait_requests(50, timeout=30)
    during = [(at, pids) for at, pids in sampler.samples if started <= at <= ended]
    counts = [len(pids) for _, pids in during if isinstance(pids, list)]
    none_alive = sum(1 for n in counts if n == 0) / len(counts) if counts else 1.0
    worst = min(counts, default=0)
    back_s = back_at - last_kill if back_at is not None else None
    kinds = load.kinds
    redispatched = server.status()["master"]["redispatched"] - redispatched_before

    targets = Targets()
    targets.require(server.proc.poll() is None, "the master stays up")
    targets.require(kinds["timeout"] == 0, f"no request timed out ({kinds['timeout']} did)")
    targets.require(kinds["partial"] == 0, f"no partial answer ({kinds['partial']})")
    targets.require(len(counts) >= 0.5 * size.for_s / size.sample_every_s,
                    f"sampled at least every {2 * size.sample_every_s:g} s ({len(counts)} samples)")
    targets.require(none_alive <= 0.05, f"no worker ready in at most 5 % of samples ({none_alive:.0%})")
    back = seconds(back_s, size.back_within_s)
    targets.require(back_s is not None and back_s <= 2.0,
                    f"all {size.workers} ready within 2 s of the last kill ({back})")
    failures = ", ".join(f"{kinds[k]} {k}" for k in ("timeout", "reset", "partial", "empty", "refused"))
    others = {k: n for k, n in kinds.items() if k not in ("timeout", "reset", "partial", "empty", "refused")}
    record(
        "a. SIGKILL chaos under load",
        f"{size.workers} workers, {size.clients} clients (new connection per request); a random ready worker "
        f"SIGKILLed every {size.kill_every_s * 1000:.0f} ms for {size.for_s:g} s ({kills} kills); "
        f"ready workers sampled every {size.sample_every_s * 1000:.0f} ms",
        f"{len(load.requests)} requests, {load.failed} failed ({failures}{f', {others}' if others else ''}); "
        f"{redispatched} re-dispatched; no worker ready in {none_alive:.0%} of {len(counts)} samples; "
        f"worst moment {worst} ready; all {size.workers} ready {back} "
        "after the last kill",
        targets,
    )
