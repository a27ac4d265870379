"""The master SIGKILLed under load: every worker must be gone within a second.

Workers ask the kernel for SIGKILL when their parent dies (``PR_SET_PDEATHSIG``,
with python-prctl) and exit on EOF on their channel either way. Timed from
the master's SIGKILL until the last worker pid has gone (a zombie waiting to
be reaped by its new parent counts as gone).
"""

from __future__ import annotations

import re
import signal
import statistics
import time
from dataclasses import dataclass

from bench.load import Load
from bench.server import Server
from tests.apps.chaos import ANSWER
from tests.chaos.support import Recorder, Targets, full_and_short, gone

APP = "tests.apps.chaos:handler"
WITHIN_S = 1.0
#: How often the worker pids are looked at (another process's state: no event to wait on).
LOOK_EVERY_S = 0.005


@dataclass(frozen=True)
class Size:
    rounds: int
    workers: int
    clients: int


FULL = Size(rounds=20, workers=4, clients=4)
SHORT = Size(rounds=1, workers=2, clients=2)


@full_and_short(FULL, SHORT, timeout_s=120)
def test_workers_are_gone_within_a_second_of_the_master(server_factory: type[Server], record: Recorder,
                                                        size: Size) -> None:
    took: list[float | None] = []
    served = 0
    for _ in range(size.rounds):
        server = server_factory("--app", APP, workers=size.workers).start()
        with Load(server.port, clients=size.clients, expect=re.compile(ANSWER), max_seconds=30) as load:
            load.wait_requests(200)
            workers = server.worker_pids()
            server.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            while not all(gone(pid) for pid in workers) and time.monotonic() - killed_at < 5.0:
                time.sleep(LOOK_EVERY_S)
            took.append(time.monotonic() - killed_at if all(gone(pid) for pid in workers) else None)
            served += load.ok
        server.wait(timeout=5)
    slowest = None if None in took else max(t for t in took if t is not None)

    targets = Targets()
    targets.require(slowest is not None and slowest <= WITHIN_S,
                    f"every worker gone within {WITHIN_S:g} s of the master's SIGKILL")
    known = sorted(t for t in took if t is not None)
    ms = [t * 1000 for t in known]
    times = f"{ms[0]:.0f}-{ms[-1]:.0f} ms (median {statistics.median(ms):.0f} ms)" if ms else "never"
    if len(known) < len(took):
        times += f", {len(took) - len(known)} time(s) over 5 s"
    record(
        "h. master SIGKILLed under load",
        f"{size.rounds} master(s) with {size.workers} workers each, SIGKILLed while {size.clients} clients "
        "made requests",
        f"last worker gone {times} after the master's SIGKILL ({served} requests answered before)",
        targets,
    )
