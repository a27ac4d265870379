"""Slow clients: connections that send nothing, or a byte a second, while the workers are at their fd limit.

The app (``tests.apps.lowfd``) lowers each worker's fd limit to 128 when it
is imported; 4 workers take 600 slow clients (half silent, half trickling a
byte a second), so each worker fills its fd table with connections whose
request never ends. A worker handed a connection it has no fd for refuses
it and drains; the master keeps the rest. Normal clients come meanwhile.
The master must stay up, and serve normal clients again once the slow ones
hang up; normal clients should be served meanwhile too, by a successor of
each worker that drained itself.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from bench.load import Load, ask
from bench.server import HOST, Server
from tests.apps.chaos import ANSWER
from tests.chaos.support import (
    WORKER_AT_LIMIT,
    Recorder,
    Targets,
    count_processes,
    full_and_short,
    seconds,
)

APP = "tests.apps.lowfd:handler"
#: A request of a normal client, while the slow ones hold the workers.
NORMAL_TIMEOUT_S = 3.0
#: How long, after the slow clients hung up, a normal client may have to wait.
SERVED_AGAIN_S = 10.0


@dataclass(frozen=True)
class Size:
    workers: int
    nofile: int
    slow: int
    hold_s: float


FULL = Size(workers=4, nofile=128, slow=600, hold_s=15.0)
SHORT = Size(workers=2, nofile=64, slow=150, hold_s=2.0)


@contextlib.contextmanager
def slow_clients(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that send no line: the even ones nothing, the odd ones a byte a second."""
    socks: list[socket.socket] = []
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(1.0):  # pacing: a byte a second
            for sock in socks[1::2]:
                with contextlib.suppress(OSError):
                    sock.send(b"x")

    trickler = threading.Thread(target=trickle, name="trickle", daemon=True)
    try:
        for _ in range(count):
            socks.append(socket.create_connection((HOST, port), timeout=10))
        trickler.start()
        yield socks
    finally:
        stop.set()
        if trickler.ident is not None:
            trickler.join(10)
        for sock in socks:
            sock.close()


@full_and_short(FULL, SHORT, timeout_s=120)
def test_slow_clients_at_the_workers_fd_limit(server_factory: type[Server], record: Recorder,
                                              size: Size) -> None:
    server = server_factory("--app", APP, workers=size.workers,
                            env={"CHAOS_NOFILE": str(size.nofile)}).start()
    with slow_clients(server.port, size.slow):
        with Load(server.port, clients=2, expect=re.compile(ANSWER), max_seconds=size.hold_s,
                  timeout=NORMAL_TIMEOUT_S) as during:
            assert during.join(size.hold_s + NORMAL_TIMEOUT_S + 5)
        status = server.status()
        held = sum(w["active"] for w in status["workers"]) + sum(d["active"] for d in status["draining"])
        pending = status["master"]["pending"]
        states = sorted(w["state"] for w in status["workers"])
    hung_up = time.monotonic()
    served_again: float | None = None
    while time.monotonic() - hung_up < SERVED_AGAIN_S:
        try:
            ask(server.port, timeout=SERVED_AGAIN_S)
        except OSError:
            continue
        served_again = time.monotonic() - hung_up
        break
    with Load(server.port, clients=2, expect=re.compile(ANSWER), max_requests=100) as after:
        assert after.join(30)
    drained = count_processes(server, WORKER_AT_LIMIT)

    targets = Targets()
    targets.require(server.proc.poll() is None, "the master stays up")
    targets.require(served_again is not None,
                    f"normal clients served within {SERVED_AGAIN_S:g} s of the slow ones hanging up")
    targets.require(after.ok == 100, f"then every normal request answered ({after.ok} of 100)")
    targets.require(during.ok > 0 and during.failed == 0,
                    f"normal clients served while the slow ones are held ({during.ok} answered, "
                    f"{during.failed} failed)")
    record(
        "i. slow clients",
        f"{size.workers} workers at {size.nofile} fds each (the app lowers its own limit); {size.slow} slow "
        f"clients (half silent, half a byte a second) held {size.hold_s:g} s, 2 normal clients meanwhile",
        f"slow ones held by workers {held}, pending in the master {pending}; {drained} worker(s) drained "
        f"themselves at their fd limit, worker states then {'/'.join(states)}; normal requests while held: "
        f"{during.ok} answered, {during.failed} failed ({dict(during.kinds)}); after the slow ones hung up, "
        f"served again in {seconds(served_again, SERVED_AGAIN_S)}, then {after.ok} of 100",
        targets,
    )
