"""The lab's locality count (``bench.apps:locality``, ``python -m bench.lab --locality``).

The count explains W2: a request is "same CPU" when the worker runs on the
CPU that received it, which on loopback is the CPU its client thread sent
it from. Pinning the client thread and the worker to CPUs makes the answer
known in advance.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import h11
import pytest

from bench.apps import LOCALITY_DIR_ENV
from bench.matrix import LOCALITY_APP, Cell, Workload, read_locality
from bench.report import headline, runs_table, summary_table
from bench.server import Server

REQUESTS = 50
CPUS = sorted(os.sched_getaffinity(0))


@pytest.fixture
def pinned_client() -> Iterator[None]:
    """Restore this thread's CPU affinity after the test."""
    before = os.sched_getaffinity(0)
    yield
    os.sched_setaffinity(0, before)


def _get(conn: h11.Connection, sock: socket.socket) -> None:
    """One keep-alive GET, answered with 200."""
    sock.sendall(conn.send(h11.Request(method="GET", target="/", headers=[("host", "lab")])))
    sock.sendall(conn.send(h11.EndOfMessage()))
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            assert event.status_code == 200
        elif isinstance(event, h11.EndOfMessage):
            conn.start_next_cycle()
            return


@pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs to place client and worker apart")
@pytest.mark.parametrize("apart", [False, True], ids=["same-cpu", "other-cpu"])
def test_locality_counts_requests_served_on_the_cpu_that_sent_them(
    server_factory: type[Server], tmp_path: Path, pinned_client: None, apart: bool
) -> None:
    server = server_factory("--app", LOCALITY_APP, workers=1, env={LOCALITY_DIR_ENV: str(tmp_path)})
    server.start()
    (worker_pid,) = server.worker_pids()
    os.sched_setaffinity(worker_pid, {CPUS[0]})
    os.sched_setaffinity(0, {CPUS[1] if apart else CPUS[0]})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        conn = h11.Connection(h11.CLIENT)
        for _ in range(REQUESTS):
            _get(conn, sock)
    counts = read_locality(tmp_path, REQUESTS, timeout_s=10)
    assert list(counts.values()) == [(REQUESTS, 0 if apart else REQUESTS)]


def test_read_locality_returns_what_there_is_when_the_counts_stay_short(tmp_path: Path) -> None:
    (tmp_path / "11.json").write_text('{"id": 1, "pid": 11, "requests": 7, "same_cpu": 3}')
    (tmp_path / "12.json").write_text("{half a file")
    assert read_locality(tmp_path, 100, timeout_s=0.1) == {1: (7, 3)}


def _cell(policy: str, locality: dict[int, tuple[int, int]]) -> Cell:
    return Cell(
        workload="W2", policy=policy, repeat=0, port=1, requests=100, requests_per_s=1000.0,
        p50_ms=1.0, p99_ms=2.0, errors=0, error_detail="", handled={1: 8, 2: 8}, master_cpu_s=0.0,
        workers_cpu_s={1: 1.0, 2: 1.0}, master_rss_bytes=None, workers_rss_bytes=[],
        locality=locality,
    )


def test_reports_show_the_same_cpu_share_only_when_counted() -> None:
    w2 = Workload("W2", "keep-alive", LOCALITY_APP, 2, close=False)
    counted = [_cell("round-robin", {1: (60, 30), 2: (40, 10)}), _cell("shared", {1: (100, 90)})]
    assert counted[0].same_cpu_share == 0.4
    assert math.isnan(_cell("shared", {}).same_cpu_share)

    table = summary_table(counted, [w2], ["round-robin", "shared"])
    assert table.splitlines()[0].endswith("| same CPU % |")
    assert table.splitlines()[2].endswith("| 40 |")
    assert table.splitlines()[3].endswith("| 90 |")
    assert "60 (50) 40 (25)" in runs_table(counted)
    assert any("round-robin 40 %, shared 90 %" in line for line in headline(counted, []))

    plain = [_cell("round-robin", {}), _cell("shared", {})]
    assert "same CPU" not in summary_table(plain, [w2], ["round-robin", "shared"])
    assert "same CPU" not in runs_table(plain)
    assert not any("same CPU" in line or "received them" in line for line in headline(plain, []))
