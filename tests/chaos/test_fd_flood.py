"""The fd-limit flood: more concurrent clients than the master and its workers have fds, and workers killed.

Master and workers run at ``prlimit --nofile=256:256`` with the default
``--max-pending`` (1024: more connections than the master can hold), under
a flood of more concurrent clients than that, each a new connection per
request, while a random ready worker is SIGKILLed every second. A worker's
replacement needs fds of the master's (a socketpair, a pidfd, the pipes of
the spawn): it must get them all the same, so that every kill is made good
within 2 s while the flood goes on; a worker handed more connections than
its own fd table has room for refuses them and drains, and needs a
successor just the same. ``ctl status`` must answer, the master must serve
as before once the flood ends, and it should say once that its pending
queue is capped by its fd limit.
"""

from __future__ import annotations

import random
import re
import shutil
import sys
import time
from dataclasses import dataclass

import pytest

from bench.flood import Flood
from bench.load import Load
from bench.server import Server
from tests.apps.chaos import ANSWER
from tests.chaos.support import (
    SPAWN_FAILED,
    WORKER_AT_LIMIT,
    Recorder,
    StatusProbe,
    Targets,
    count_lines,
    count_processes,
    full_and_short,
    kill_random,
    seconds,
    served_within,
)

APP = "tests.apps.chaos:handler"
NOFILE = 256
WORKERS = 4
CLIENTS = 600
#: The line saying that the pending queue was capped: what it is capped by, and that it is the fd limit.
CAPPED = re.compile(r"(?i)\[master\].*pending.*(fd limit|file descriptors|open files|RLIMIT_NOFILE)")
#: How long after the last kill its replacement is waited for.
LAST_RESTORE_S = 15.0
#: How long after the flood the master is given to serve again; then a normal load of AFTER requests.
RECOVER_S = 30.0
AFTER = 200


@dataclass(frozen=True)
class Size:
    kills: int
    kill_every_s: float = 1.0
    sample_every_s: float = 0.05


FULL = Size(kills=60)
SHORT = Size(kills=3)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
@full_and_short(FULL, SHORT, timeout_s=240)
def test_workers_come_back_at_the_fd_limit_under_a_flood(server_factory: type[Server], record: Recorder,
                                                         size: Size) -> None:
    launcher = ("prlimit", f"--nofile={NOFILE}:{NOFILE}", sys.executable, "-m", "dispatcher")
    server = server_factory("--app", APP, workers=WORKERS, launcher=launcher).start()
    errors_before = server.status()["master"]["accept_errors"]
    rng = random.Random()
    status = StatusProbe(server)
    kills: list[tuple[float, int]] = []
    restored: dict[int, float] = {}  # kill number: seconds until every worker was ready again
    most_pending = skipped = 0
    flood_s = size.kills * size.kill_every_s + 1.0

    def sample() -> None:
        nonlocal most_pending
        snapshot = status.probe()
        if snapshot is None:
            return
        most_pending = max(most_pending, snapshot["master"]["pending"])
        ready = {w["pid"] for w in snapshot["workers"] if w["state"] == "ready"}
        if len(ready) == WORKERS:
            now = time.monotonic()
            for n, (at, pid) in enumerate(kills):
                if n not in restored and pid not in ready:
                    restored[n] = now - at

    with Flood(server.port, CLIENTS, seconds=flood_s, expect=ANSWER) as flood:
        time.sleep(0.5)  # pacing: the flood is under way before the first kill
        started = time.monotonic()
        for n in range(size.kills):
            snapshot = status.probe()
            # Without a status (the master at its fd limit), any live worker will do.
            pids = ([w["pid"] for w in snapshot["workers"] if w["state"] == "ready" and w["pid"]]
                    if snapshot else server.worker_pids())
            killed = kill_random(pids, rng) if pids else None
            if killed is not None:
                kills.append((time.monotonic(), killed))
            else:
                skipped += 1  # no worker alive to kill
            # Pacing: sample until the next kill is due, a fixed interval after the first.
            while time.monotonic() < started + (n + 1) * size.kill_every_s:
                sample()
                time.sleep(size.sample_every_s)
        deadline = time.monotonic() + LAST_RESTORE_S
        while len(restored) < len(kills) and time.monotonic() < deadline:
            sample()
            time.sleep(size.sample_every_s)
        result = flood.wait()
    served_again = served_within(server.port, RECOVER_S)
    after_ok = 0
    if served_again is not None:
        with Load(server.port, clients=2, expect=re.compile(ANSWER), max_requests=AFTER, max_seconds=30,
                  timeout=5) as after:
            after.join(40)
        after_ok = after.ok
    capped = count_lines(server, CAPPED)
    at_limit = count_processes(server, WORKER_AT_LIMIT)
    spawns_failed = count_lines(server, SPAWN_FAILED)
    final = StatusProbe(server).probe()
    pauses = final["master"]["accept_errors"] - errors_before if final is not None else None
    slowest = max(restored.values(), default=None) if len(restored) == len(kills) else None
    late = sum(1 for n in range(len(kills)) if restored.get(n, float("inf")) > 2.0)

    targets = Targets()
    targets.require(server.proc.poll() is None, "the master stays up")
    targets.require(len(kills) > 0, "workers killed")
    targets.require(result.failures.get("partial", 0) == 0, "no partial answer")
    targets.require(late == 0 and skipped == 0,
                    f"every kill made good within 2 s ({late} of {len(kills)} took longer; "
                    f"{skipped} time(s) no worker was left to kill)")
    targets.require(served_again is not None and served_again <= 2.0 and after_ok == AFTER,
                    f"served within 2 s of the flood's end, then {AFTER} of {AFTER} "
                    f"({seconds(served_again, RECOVER_S)}, {after_ok})")
    targets.require(status.answered == status.probes,
                    f"ctl status answered within {status.attempts} tries "
                    f"({status.answered} of {status.probes})")
    targets.require(capped == 1,
                    f"one log line saying the pending queue is capped by the fd limit ({capped})")
    record(
        "e. fd-limit flood",
        f"master and {WORKERS} workers at `prlimit --nofile={NOFILE}:{NOFILE}`, default --max-pending; "
        f"{CLIENTS} concurrent clients (new connection per request) for {flood_s:g} s; a random ready worker "
        f"SIGKILLed every {size.kill_every_s:g} s ({size.kills} times)",
        f"{result.sent} requests, {result.failed} failed ({result.describe_failures()}); {len(kills)} kills, "
        f"slowest return to {WORKERS} ready {seconds(slowest, LAST_RESTORE_S)} ({late} over 2 s, "
        f"{skipped} time(s) none left to kill); served {seconds(served_again, RECOVER_S)} after the "
        f"flood, then {after_ok} of {AFTER}; {'?' if pauses is None else pauses} accepts failed (EMFILE), "
        f"at most {most_pending} pending; {at_limit} worker(s) drained at their own fd limit, "
        f"{spawns_failed} worker start(s) failed with EMFILE; {status.describe()}; pending-cap log lines: "
        f"{capped}",
        targets,
    )
