"""The Prometheus endpoint: a real master scraped over HTTP, and the exporter on its own."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any, cast

import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from bench.load import ask
from bench.server import Server
from dispatcher.lifecycle import WorkerState
from dispatcher.listeners import BindError
from dispatcher.metrics import MetricsServer
from tests.helpers import wait_for

APP = "tests.apps.handlers:pid"
PER_WORKER_COUNTERS = [
    "dispatcher_worker_handed_off", "dispatcher_worker_acked", "dispatcher_worker_refused",
    "dispatcher_worker_handled", "dispatcher_worker_accepted", "dispatcher_worker_restarts",
]
PER_WORKER_GAUGES = [
    "dispatcher_worker_active_connections", "dispatcher_worker_up", "dispatcher_worker_uptime_seconds",
    "dispatcher_worker_resident_memory_bytes", "dispatcher_worker_unique_memory_bytes",
    "dispatcher_worker_cpu_percent", "dispatcher_worker_open_fds",
]
MASTER_SERIES = [
    "dispatcher_accepted", "dispatcher_accept_errors", "dispatcher_handoff_messages",
    "dispatcher_redispatched", "dispatcher_expired",
    "dispatcher_pending_connections", "dispatcher_inflight_handoffs", "dispatcher_accept_rate_per_second",
    "dispatcher_workers_wanted", "dispatcher_master_uptime_seconds",
    "dispatcher_master_resident_memory_bytes", "dispatcher_master_open_fds",
]

Families = dict[str, Metric]


def scrape(address: str, timeout: float = 10.0) -> Families:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as response:
        assert response.status == 200
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: Families, name: str) -> float:
    (sample,) = families[name].samples
    return sample.value


def per_worker(families: Families, name: str) -> dict[str, float]:
    """``{worker id: value}`` of a per-worker family (the ``_total`` samples of a counter)."""
    family = families[name]
    wanted = f"{name}_total" if family.type == "counter" else name
    return {s.labels["worker"]: s.value for s in family.samples if s.name == wanted}


def scrape_until(address: str, done: Callable[[Families], bool], timeout: float, what: str) -> Families:
    """Scrape until ``done``: the counts come from acks and pongs, with no event to wait on here."""
    deadline = time.monotonic() + timeout
    while True:
        families = scrape(address)
        if done(families):
            return families
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}; last scrape: {families}")
        time.sleep(0.05)


def start_metrics(server_factory: type[Server], workers: int) -> tuple[Server, str]:
    server = server_factory("--app", APP, "--metrics", "127.0.0.1:0", "--ping-interval", "0.2",
                            workers=workers).start()
    address = server.metrics_address()
    assert f"metrics at http://{address}/metrics" in server.log
    return server, address


def test_metrics_per_worker_series_and_counts(server_factory: type[Server]) -> None:
    server, address = start_metrics(server_factory, workers=3)
    ids = {"0", "1", "2"}
    connections = 30
    answers = [ask(server.port) for _ in range(connections)]
    assert {a.split()[0] for a in answers} == ids

    families = scrape_until(
        address,
        lambda f: (sum(per_worker(f, "dispatcher_worker_acked").values()) == connections
                   and sum(per_worker(f, "dispatcher_worker_handled").values()) == connections),
        timeout=10, what=f"{connections} connections acked and handled",
    )
    assert sum(per_worker(families, "dispatcher_worker_handed_off").values()) == connections
    assert sum(per_worker(families, "dispatcher_worker_refused").values()) == 0
    assert value(families, "dispatcher_accepted") == connections
    assert value(families, "dispatcher_scrape_error") == 0

    for name in PER_WORKER_COUNTERS + PER_WORKER_GAUGES:
        assert families[name].type == ("counter" if name in PER_WORKER_COUNTERS else "gauge"), name
        assert set(per_worker(families, name)) == ids, name
    assert per_worker(families, "dispatcher_worker_up") == dict.fromkeys(ids, 1)
    states = {(s.labels["worker"], s.labels["state"]): s.value
              for s in families["dispatcher_worker_state"].samples}
    assert states == {(w, st.value): float(st is WorkerState.READY) for w in ids for st in WorkerState}
    # Pongs every 0.2 s: every worker has answered at least one ping by now.
    assert set(per_worker(families, "dispatcher_worker_ping_rtt_seconds")) == ids
    assert all(0 <= v < 5 for v in per_worker(families, "dispatcher_worker_ping_rtt_seconds").values())

    rss = [*per_worker(families, "dispatcher_worker_resident_memory_bytes").values(),
           value(families, "dispatcher_master_resident_memory_bytes")]
    assert all(1 << 20 < v < 2 << 30 for v in rss), rss

    for name in MASTER_SERIES:
        assert name in families, name
    assert value(families, "dispatcher_workers_wanted") == 3
    (info,) = families["dispatcher_info"].samples
    assert info.labels["app"] == APP and info.labels["policy"] == "round-robin"
    assert {"version", "loop"} <= set(info.labels)

    server.signal(signal.SIGTERM)
    assert server.wait(timeout=10) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1])), timeout=2).close()


def test_metrics_counters_monotonic_across_worker_restart(server_factory: type[Server]) -> None:
    server, address = start_metrics(server_factory, workers=2)
    first = 10
    pids = dict(ask(server.port).split() for _ in range(first))
    assert set(pids) == {"0", "1"}
    before = scrape_until(
        address, lambda f: sum(per_worker(f, "dispatcher_worker_acked").values()) == first,
        timeout=10, what=f"{first} connections acked",
    )
    handed_off_before = per_worker(before, "dispatcher_worker_handed_off")
    assert handed_off_before["0"] > 0

    os.kill(int(pids["0"]), signal.SIGKILL)
    replacement = server.wait_line(r"worker 0 \(pid (\d+)\) ready", timeout=10).group(1)
    assert replacement != pids["0"]

    after = scrape(address)
    handed_off_after = per_worker(after, "dispatcher_worker_handed_off")
    assert handed_off_after["0"] >= handed_off_before["0"]
    assert handed_off_after["1"] >= handed_off_before["1"]
    assert per_worker(after, "dispatcher_worker_restarts")["0"] >= 1

    more = 10
    for _ in range(more):
        ask(server.port)
    later = scrape_until(
        address, lambda f: sum(per_worker(f, "dispatcher_worker_acked").values()) == first + more,
        timeout=10, what=f"{first + more} connections acked",
    )
    assert sum(per_worker(later, "dispatcher_worker_handed_off").values()) == first + more
    assert per_worker(later, "dispatcher_worker_handed_off")["0"] >= handed_off_after["0"]


# The exporter on its own: a snapshot function on an event loop this test controls.


def canned_snapshot() -> dict[str, Any]:
    master = {"version": "9.9", "policy": "round-robin", "loop": "asyncio", "app": "a:b",
              "accepted": 5, "accept_errors": 0, "handoff_messages": 4, "redispatched": 1,
              "expired": 0, "pending": 2,
              "in_flight": 1, "accept_rate": 0.5, "workers_wanted": 1, "uptime_s": 3.0,
              "rss_bytes": None, "cpu_percent": None, "open_fds": None}
    worker = {"id": 0, "state": "starting", "handed_off": 4, "acked": 3, "refused": 0, "handled": 3,
              "accepted": 0, "restarts": 2, "active": 1, "uptime_s": 1.5, "ping_rtt_ms": 2.5,
              "ping_rtt_avg_ms": None, "loop_lag_ms": None, "rss_bytes": 123, "uss_bytes": None,
              "cpu_percent": None, "open_fds": None}
    return {"master": master, "workers": [worker]}


@pytest.fixture
def loop(loop_on_a_thread: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
    """The master's loop stands in running on a thread of its own; the test is the HTTP client."""
    return loop_on_a_thread


def on_loop(loop: asyncio.AbstractEventLoop, call: Callable[[], Any]) -> Any:
    async def run() -> Any:
        return call()

    return asyncio.run_coroutine_threadsafe(run(), loop).result(5)


def exporter(loop: asyncio.AbstractEventLoop, snapshot: Callable[[], dict[str, Any]],
             timeout_s: float = 2.0, bind: str = "127.0.0.1:0") -> MetricsServer:
    metrics = MetricsServer(cast(Any, snapshot), bind, timeout_s=timeout_s)
    on_loop(loop, metrics.start)
    return metrics


def test_exporter_serves_snapshot_and_skips_missing_values(loop: asyncio.AbstractEventLoop) -> None:
    metrics = exporter(loop, canned_snapshot)
    try:
        host, port = metrics.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        families = scrape(metrics.address)
        assert value(families, "dispatcher_scrape_error") == 0
        assert value(families, "dispatcher_redispatched") == 1
        assert value(families, "dispatcher_handoff_messages") == 4
        assert value(families, "dispatcher_pending_connections") == 2
        assert "dispatcher_master_resident_memory_bytes" not in families
        assert per_worker(families, "dispatcher_worker_restarts") == {"0": 2}
        assert per_worker(families, "dispatcher_worker_up") == {"0": 0}
        assert per_worker(families, "dispatcher_worker_ping_rtt_seconds") == {"0": 0.0025}
        assert per_worker(families, "dispatcher_worker_ping_rtt_avg_seconds") == {}
        assert per_worker(families, "dispatcher_worker_resident_memory_bytes") == {"0": 123}
        # Only what the snapshot gives: no process or GC collectors of the global registry.
        assert all(name.startswith("dispatcher_") for name in families)
        # Scraped on the loop itself (say, by the master): no deadlock.
        text = on_loop(loop, lambda: generate_latest(metrics.registry)).decode()
        assert "dispatcher_scrape_error 0.0" in text
    finally:
        metrics.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(port)), timeout=2).close()


def test_exporter_never_hangs_on_a_blocked_loop(loop: asyncio.AbstractEventLoop) -> None:
    release = threading.Event()
    calls = []

    def blocked() -> dict[str, Any]:
        calls.append(threading.get_ident())
        release.wait(10)
        return canned_snapshot()

    metrics = exporter(loop, blocked, timeout_s=0.3)
    try:
        started = time.monotonic()
        families = scrape(metrics.address)
        assert time.monotonic() - started < 3
        assert list(families) == ["dispatcher_scrape_error"]
        assert value(families, "dispatcher_scrape_error") == 1
        assert len(calls) == 1  # and it ran on the loop's thread, not the HTTP one
        release.set()
        # The loop is back: the next scrape is whole again.
        families = scrape(metrics.address)
        assert value(families, "dispatcher_scrape_error") == 0
        assert "dispatcher_worker_handed_off" in families
    finally:
        release.set()
        metrics.close()


def test_exporter_reports_a_failing_snapshot_without_raising_on_the_loop(
    loop: asyncio.AbstractEventLoop,
) -> None:
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))

    def broken() -> dict[str, Any]:
        raise RuntimeError("snapshot broke")

    metrics = exporter(loop, broken)
    try:
        families = scrape(metrics.address)
        assert list(families) == ["dispatcher_scrape_error"]
        assert value(families, "dispatcher_scrape_error") == 1
        assert on_loop(loop, lambda: "alive") == "alive"
        assert errors == []
    finally:
        metrics.close()


def test_exporter_reports_a_stopped_loop(loop: asyncio.AbstractEventLoop) -> None:
    metrics = exporter(loop, canned_snapshot, timeout_s=0.3)
    try:
        loop.call_soon_threadsafe(loop.stop)
        wait_for(lambda: not loop.is_running(), 5, "the loop did not stop")
        families = scrape(metrics.address)
        assert value(families, "dispatcher_scrape_error") == 1
    finally:
        metrics.close()


def test_exporter_bind_errors_are_clear(loop: asyncio.AbstractEventLoop) -> None:
    with pytest.raises(BindError, match="not a Unix socket"):
        MetricsServer(cast(Any, canned_snapshot), "unix:/tmp/x.sock")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BindError, match=f"metrics bind '127.0.0.1:{port}': Address already in use"):
            exporter(loop, canned_snapshot, bind=f"127.0.0.1:{port}")
