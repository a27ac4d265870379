"""Hung workers: a request that blocks its worker's event loop for good, with normal traffic around it.

The ping timeout must catch the worker, kill it and start another, and
every normal request must be answered: those handed to the hung worker
after it hung never started (a worker acks a connection as its handler
starts) and go to another worker. The hanging request is made to travel
in one batch with others (the master is stopped while they connect, so it
accepts them in one batch and deals them out in turn). Those dealt to the
other worker are served. Those dealt to the hung worker started beside the
hanging one (their tasks ran, and their requests were read, before it
blocked the loop): they are lost with the worker, as with any server, but
must end at once when it is killed, never time out or get half an answer.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import time
from dataclasses import dataclass

from bench.load import Load, read_all
from bench.server import HOST, Server
from tests.apps.chaos import ANSWER
from tests.chaos.support import Recorder, Targets, full_and_short
from tests.helpers import wait_for

APP = "tests.apps.chaos:handler"
PING_INTERVAL_S = 0.2
PING_TIMEOUT_S = 1.0
#: The ping timeout, then SIGTERM (which a blocked loop cannot act on) and SIGKILL a second later.
KILL_GRACE_S = 1.0


@dataclass(frozen=True)
class Size:
    rounds: int
    batch_mates: int
    clients: int
    #: Normal requests answered after each replacement before the round ends.
    after: int


FULL = Size(rounds=8, batch_mates=8, clients=4, after=500)
SHORT = Size(rounds=1, batch_mates=4, clients=2, after=50)


def _accepted(server: Server, count: int) -> bool:
    """The master has accepted ``count`` connections in all."""
    return server.status()["master"]["accepted"] >= count


def _outcome(sock: socket.socket) -> str:
    try:
        answer = read_all(sock)
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return type(exc).__name__
    return "ok" if re.fullmatch(ANSWER, answer) else ("empty" if not answer else "partial")


@full_and_short(FULL, SHORT, timeout_s=180)
def test_a_hung_worker_is_replaced_and_nothing_is_lost(server_factory: type[Server], record: Recorder,
                                                       size: Size) -> None:
    server = server_factory("--app", APP, "--ping-interval", str(PING_INTERVAL_S),
                            "--ping-timeout", str(PING_TIMEOUT_S), workers=2).start()
    detected: list[float] = []
    replaced: list[float] = []
    mates_ok = mates_total = 0
    mate_failures: list[str] = []
    sent = failed = 0
    failures: dict[str, int] = {}
    for _ in range(size.rounds):
        accepted = server.status()["master"]["accepted"]
        hang = socket.create_connection((HOST, server.port), timeout=10)
        mates: list[socket.socket] = []
        # Stopped, the master accepts nothing: the hanging request and its mates wait
        # in the kernel's backlog, and are accepted and dealt out in one batch.
        os.kill(server.pid, signal.SIGSTOP)
        try:
            hang.sendall(b"hang\n")
            for _ in range(size.batch_mates):
                mates.append(socket.create_connection((HOST, server.port), timeout=10))
                mates[-1].sendall(b"hi\n")
        finally:
            os.kill(server.pid, signal.SIGCONT)
            dealt_at = time.monotonic()
        # The load starts once that batch is taken and the worker is stuck, so that none of
        # its requests is in the batch, and none is acked by the worker before it hangs.
        wait_for(functools.partial(_accepted, server, accepted + 1 + size.batch_mates), 10,
                 "the master did not accept the batch")
        with hang.makefile("rb") as said:
            assert said.readline().startswith(b"hanging "), "the hanging request was not served"
        with Load(server.port, clients=size.clients, expect=re.compile(ANSWER), max_seconds=60) as load:
            hung = server.wait_line(r"worker (\d+) \(pid (\d+)\) is unresponsive", timeout=10)
            detected.append(time.monotonic() - dealt_at)
            server.wait_line(rf"pid {hung.group(2)}\) killed by SIG", timeout=10)
            server.wait_line(rf"worker {hung.group(1)} \(pid \d+\) ready", timeout=20)
            replaced.append(time.monotonic() - dealt_at)
            load.wait_requests(size.after, timeout=30)
        sent += len(load.requests)
        failed += load.failed
        for kind, n in load.kinds.items():
            failures[kind] = failures.get(kind, 0) + n
        outcomes = [_outcome(mate) for mate in mates]
        for sock in (hang, *mates):
            sock.close()
        mates_total += len(outcomes)
        mates_ok += outcomes.count("ok")
        mate_failures += [o for o in outcomes if o != "ok"]

    targets = Targets()
    targets.require(server.proc.poll() is None, "the master stays up")
    targets.require(failed == 0, f"every normal request answered ({failed} failed: {failures})")
    bound = PING_TIMEOUT_S + KILL_GRACE_S + 3.0  # then the restart: its backoff and the boot
    targets.require(max(replaced) <= bound,
                    f"replaced within {bound:g} s of the hang ({max(replaced):.2f} s)")
    cut = [kind for kind in mate_failures if kind not in ("empty", "ConnectionResetError")]
    targets.require(not cut, f"no batch mate timed out or got half an answer ({cut})")
    targets.require(mates_ok >= mates_total // 2,
                    f"the batch mates dealt to the other worker served ({mates_ok} of {mates_total})")
    lost = {kind: mate_failures.count(kind) for kind in sorted(set(mate_failures))}
    record(
        "b. hung worker",
        f"2 workers, ping every {PING_INTERVAL_S:g} s, timeout {PING_TIMEOUT_S:g} s; {size.rounds} time(s) a "
        f"request that blocks the event loop for good, sent in one batch with {size.batch_mates} others, "
        f"then {size.clients} clients of normal traffic",
        f"hung worker found after {max(detected):.2f} s, replaced after "
        f"{min(replaced):.2f}-{max(replaced):.2f} s; "
        f"{failed} of {sent} normal requests failed; {mates_ok} of {mates_total} batch mates served"
        + (f" (lost: {lost})" if lost else ""),
        targets,
    )
