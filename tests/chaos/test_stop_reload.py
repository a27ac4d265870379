"""Graceful stop and rolling reload, each while clients keep making requests.

- SIGTERM: connections in the backlog are accepted, handed off and
  answered; the listeners close, so later clients are refused, and a
  client whose handshake the kernel completed between the last accept and
  the close is reset (counted); no request is cut short or left waiting,
  and the master exits 0 with every worker gone.
- ``reload`` on the control socket: every worker replaced, one at a time,
  and not one request fails.
"""

from __future__ import annotations

import re
import signal
import time
from dataclasses import dataclass

from bench.load import Load, failure_kind
from bench.server import Server
from tests.apps.chaos import ANSWER
from tests.chaos.support import Recorder, Targets, full_and_short, gone

APP = "tests.apps.chaos:handler"
WORKERS = 4


@dataclass(frozen=True)
class Size:
    stops: int
    reloads: int
    clients: int


FULL = Size(stops=20, reloads=10, clients=8)
SHORT = Size(stops=1, reloads=1, clients=4)


@full_and_short(FULL, SHORT, timeout_s=300)
def test_graceful_stop_and_rolling_reload_under_load(server_factory: type[Server], record: Recorder,
                                                     size: Size) -> None:
    targets = Targets()
    # Graceful stops.
    answered = refused = resets = 0
    lost: dict[str, int] = {}
    stop_s: list[float] = []
    for _ in range(size.stops):
        server = server_factory("--app", APP, workers=WORKERS).start()
        with Load(server.port, clients=size.clients, expect=re.compile(ANSWER), max_seconds=60,
                  timeout=5) as load:
            load.wait_requests(500)
            workers = server.worker_pids()
            sent_at = time.monotonic()
            server.signal(signal.SIGTERM)
            code = server.wait(timeout=15)
            stop_s.append(time.monotonic() - sent_at)
        targets.require(code == 0, f"the master exits 0 ({code})")
        targets.require(all(gone(pid) for pid in workers), "every worker gone with it")
        served, _, failures = load.between(sent_at, time.monotonic() + 60)
        answered += served
        for error, n in failures.items():
            kind = failure_kind(error)
            if kind == "refused":
                refused += n
            elif kind == "reset":
                resets += n
            else:
                lost[kind] = lost.get(kind, 0) + n
        targets.require(load.failed == sum(failures.values()), "no request failed before the SIGTERM")
    targets.require(not lost, f"after SIGTERM, no request cut short or timed out ({lost})")

    # Rolling reloads.
    server = server_factory("--app", APP, workers=WORKERS).start()
    reload_s: list[float] = []
    with Load(server.port, clients=size.clients, expect=re.compile(ANSWER), max_seconds=120) as load:
        load.wait_requests(200)
        for _ in range(size.reloads):
            before = set(server.worker_pids())
            started = time.monotonic()
            result = server.request("reload", timeout_s=60)
            reload_s.append(time.monotonic() - started)
            targets.require(result == {"reloaded": WORKERS}, f"reload answered {result}")
            after = {w["pid"] for w in server.status()["workers"]}
            targets.require(len(after) == WORKERS and not before & after, "every worker replaced")
            load.wait_requests(200)
    targets.require(load.failed == 0, f"not one request failed during the reloads ({dict(load.kinds)})")
    record(
        "j. graceful stop and rolling reload under load",
        f"{WORKERS} workers, {size.clients} clients (new connection per request); SIGTERM {size.stops} "
        f"time(s); `ctl reload` {size.reloads} time(s)",
        f"stop: {max(stop_s):.2f} s at most to exit 0; after SIGTERM {answered} answered, {refused} refused "
        f"(listener closed), {resets} reset, {sum(lost.values())} cut short or timed out; "
        f"reload: {min(reload_s):.2f}-{max(reload_s):.2f} s "
        f"each, {len(load.requests)} requests during them, {load.failed} failed",
        targets,
    )
