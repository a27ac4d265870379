"""Prometheus metrics for the master and its workers, served over HTTP.

Theory of operation (threads)
-----------------------------
Every number lives in the master process, on its event loop thread: workers
report theirs in pongs and the master keeps the sums (``dispatcher.snapshot``).
So there is no prometheus_client multiprocess mode and no shared files, only
one dedicated ``CollectorRegistry`` holding one ``Collector``.

- The master's loop thread calls ``start`` and ``close``. ``start`` binds the
  HTTP socket (prometheus_client's threading WSGI server and its
  ``make_wsgi_app``) and starts its daemon thread; ``close`` shuts that
  server down and joins the thread. Given a readiness function, the same
  listener answers ``/healthz`` and ``/readyz`` too (``dispatcher.probes``
  wraps the metrics app); every other path is the metrics app's, as before.
- The HTTP thread (one per request: the server is threading) runs
  ``collect`` at scrape time. It never reads master state itself: it has the
  snapshot taken on the loop (``dispatcher.threadsafe.call_on_loop``), so the
  numbers are one consistent snapshot taken between two loop callbacks.
- If the loop does not answer within ``timeout_s`` (it is blocked, busy or
  already stopped), or the snapshot raises, the scrape yields only
  ``dispatcher_scrape_error 1``: a scrape never hangs and nothing raises on
  the loop.

Counters come straight from the snapshot, whose per-worker counts are
already kept monotonic across restarts by each slot's ``Totals``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import WSGIApplication

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

from dispatcher import probes
from dispatcher.lifecycle import WorkerState
from dispatcher.listeners import BindError, parse_bind
from dispatcher.snapshot import MasterFigures, Snapshot, WorkerFigures
from dispatcher.threadsafe import LoopUnavailable, call_on_loop

log = logging.getLogger(__name__)

#: How long a scrape waits for the master's loop to take a snapshot.
DEFAULT_TIMEOUT_S = 2.0
#: How long ``close`` waits for the HTTP thread to end.
_JOIN_TIMEOUT_S = 5.0


class MetricsServer:
    """``/metrics`` on ``HOST:PORT``, numbers taken from ``snapshot()``.

    Parameters:
        snapshot: the master's snapshot function (only ever called on its loop).
        bind: ``HOST:PORT`` or ``[IPV6]:PORT``; port 0 picks a free port.
        timeout_s: how long a scrape waits for the master's loop.
        readiness: if given, ``/healthz`` and ``/readyz`` are served too, and
            this says why the master is not ready (``dispatcher.probes``).
        probe_timeout_s: how long a probe waits for the master's loop.

    Raises:
        BindError: ``bind`` is not a TCP address.
    """

    def __init__(self, snapshot: Callable[[], Snapshot], bind: str,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 readiness: probes.Readiness | None = None,
                 probe_timeout_s: float = probes.DEFAULT_TIMEOUT_S) -> None:
        spec = parse_bind(bind)
        if spec.is_unix:
            raise BindError(f"metrics bind {bind!r}: expected HOST:PORT, not a Unix socket")
        assert spec.host is not None and spec.port is not None
        self._take = snapshot
        self.spec = spec
        self.timeout_s = timeout_s
        self._readiness = readiness
        self.probe_timeout_s = probe_timeout_s
        #: ``HOST:PORT`` with the real port, once started.
        self.address = bind
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = SnapshotCollector(self._snapshot)
        self.registry.register(self._collector)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve in a daemon thread. Call on the master's running loop.

        Raises:
            BindError: the address cannot be bound; nothing is left open.
            RuntimeError: no event loop is running in this thread.
        """
        loop = self._loop = asyncio.get_running_loop()
        assert self.spec.host is not None and self.spec.port is not None
        app: WSGIApplication = make_wsgi_app(self.registry)
        if self._readiness is not None:
            app = probes.Probes(loop, self._readiness, self.probe_timeout_s).around(app)
        try:
            self._httpd, self._thread = _serve(app, self.spec.host, self.spec.port)
        except OSError as exc:
            raise BindError(f"metrics bind {self.spec.text!r}: {exc.strerror or exc}") from exc
        sock = self._httpd.socket
        host, port = sock.getsockname()[:2]
        self.address = f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"

    def close(self) -> None:
        """Stop serving and close the socket (idempotent).

        A scrape still waiting for the loop ends on its own timeout.
        """
        httpd, self._httpd = self._httpd, None
        thread, self._thread = self._thread, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(_JOIN_TIMEOUT_S)

    def _snapshot(self) -> Snapshot | None:
        """Return the snapshot taken on the loop, or None if it failed or timed out."""
        loop = self._loop
        if loop is None:
            return None
        try:
            return call_on_loop(loop, self._take, self.timeout_s)
        except LoopUnavailable as exc:
            log.warning("metrics scrape: %s", exc)
        except Exception as exc:
            log.warning("metrics scrape: snapshot failed: %r", exc)
        return None


class _QuietHandler(WSGIRequestHandler):
    """Logs no line per request (a scrape or probe every second would flood the log)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _serve(app: WSGIApplication, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Bind ``host:port`` (IPv4 or IPv6, as it resolves) and serve ``app`` on a daemon thread.

    prometheus_client's ``start_http_server``, with the app passed in.

    Raises:
        OSError: the address cannot be resolved or bound.
    """
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingWSGIServer):
        address_family = family

    httpd = make_server(str(sockaddr[0]), port, app, Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return httpd, thread


class SnapshotCollector:
    """Turns a master snapshot into metric families, at scrape time.

    Parameters:
        snapshot: returns a snapshot (``dispatcher.snapshot``), or None when none
            could be taken (then only ``dispatcher_scrape_error 1`` is yielded).
    """

    def __init__(self, snapshot: Callable[[], Snapshot | None]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        # Registering must not scrape: start() runs on the loop that answers scrapes.
        return []

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        yield _gauge("dispatcher_scrape_error",
                     "1 if the master's numbers could not be read for this scrape",
                     1 if snapshot is None else 0)
        if snapshot is not None:
            yield from _master_families(snapshot["master"])
            yield from _worker_families(snapshot["workers"])


def _gauge(name: str, documentation: str, value: float, unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value, unit=unit)


def _master_families(master: MasterFigures) -> Iterator[Metric]:
    yield InfoMetricFamily(
        "dispatcher", "The master's version, policy, event loop and app",
        value={key: str(master[key]) for key in ("version", "policy", "loop", "app")},
    )
    counters = [
        ("dispatcher_accepted", "accepted", "Connections the master accepted"),
        ("dispatcher_accept_errors", "accept_errors", "Errors from accept() in the master"),
        ("dispatcher_handoff_messages", "handoff_messages",
         "Hand-off datagrams the master sent (each carries one or more connections)"),
        ("dispatcher_redispatched", "redispatched",
         "Connections put back in line for another worker (theirs died un-acked or refused them)"),
        ("dispatcher_expired", "expired", "Connections closed after waiting too long for a worker"),
    ]
    figures = _by_key(master)
    for name, key, documentation in counters:
        yield CounterMetricFamily(name, documentation, value=figures[key])
    gauges = [
        ("dispatcher_pending_connections", "pending", "Connections waiting for a free worker", ""),
        ("dispatcher_inflight_handoffs", "in_flight", "Connections handed off and not yet acked", ""),
        ("dispatcher_accept_rate_per_second", "accept_rate",
         "Connections accepted per second over the last second", ""),
        ("dispatcher_workers_wanted", "workers_wanted", "Worker processes the master keeps running", ""),
        ("dispatcher_master_uptime_seconds", "uptime_s", "Seconds since the master started", "seconds"),
        ("dispatcher_master_resident_memory_bytes", "rss_bytes", "The master's resident set size", "bytes"),
        ("dispatcher_master_cpu_percent", "cpu_percent",
         "The master's CPU use since the previous reading, in percent of one CPU", ""),
        ("dispatcher_master_open_fds", "open_fds", "File descriptors open in the master", ""),
    ]
    for name, key, documentation, unit in gauges:
        value = figures.get(key)
        if value is not None:
            yield _gauge(name, documentation, value, unit)


#: Per-worker counters: (name, snapshot key, help).
_WORKER_COUNTERS = [
    ("dispatcher_worker_handed_off", "handed_off", "Connections the master handed to this worker"),
    ("dispatcher_worker_acked", "acked", "Hand-offs this worker acknowledged"),
    ("dispatcher_worker_refused", "refused", "Hand-offs this worker refused"),
    ("dispatcher_worker_handled", "handled", "Connections this worker finished handling (from its pongs)"),
    ("dispatcher_worker_accepted", "accepted", "Connections this worker accepted itself (shared, reuseport)"),
    ("dispatcher_worker_restarts", "restarts", "Times this worker slot was restarted"),
]
#: Per-worker gauges: (name, snapshot key, help, unit, divisor to the unit).
_WORKER_GAUGES = [
    ("dispatcher_worker_active_connections", "active", "Connections open in this worker", "", 1),
    ("dispatcher_worker_uptime_seconds", "uptime_s", "Seconds since this worker's process started",
     "seconds", 1),
    ("dispatcher_worker_ping_rtt_seconds", "ping_rtt_ms", "Round trip of the last ping", "seconds", 1000),
    ("dispatcher_worker_ping_rtt_avg_seconds", "ping_rtt_avg_ms",
     "Average ping round trip of this worker's process", "seconds", 1000),
    ("dispatcher_worker_loop_lag_seconds", "loop_lag_ms", "Event-loop lag this worker last reported",
     "seconds", 1000),
    ("dispatcher_worker_resident_memory_bytes", "rss_bytes", "This worker's resident set size", "bytes", 1),
    ("dispatcher_worker_unique_memory_bytes", "uss_bytes", "This worker's unique set size", "bytes", 1),
    ("dispatcher_worker_cpu_percent", "cpu_percent",
     "This worker's CPU use since the previous reading, in percent of one CPU", "", 1),
    ("dispatcher_worker_open_fds", "open_fds", "File descriptors open in this worker", "", 1),
]


def _by_key(figures: MasterFigures | WorkerFigures) -> dict[str, Any]:
    """``figures`` for lookups by a key the tables here hold as data."""
    return cast(dict[str, Any], figures)


def _worker_families(workers: Sequence[WorkerFigures]) -> Iterator[Metric]:
    for name, key, documentation in _WORKER_COUNTERS:
        counter = CounterMetricFamily(name, documentation, labels=["worker"])
        for entry in workers:
            counter.add_metric([str(entry["id"])], _by_key(entry)[key])
        yield counter
    up = GaugeMetricFamily("dispatcher_worker_up", "1 if this worker is ready for connections",
                           labels=["worker"])
    state = GaugeMetricFamily("dispatcher_worker_state", "1 for the state this worker slot is in",
                              labels=["worker", "state"])
    for entry in workers:
        worker_id = str(entry["id"])
        up.add_metric([worker_id], 1 if entry["state"] == WorkerState.READY.value else 0)
        for member in WorkerState:
            state.add_metric([worker_id, member.value], 1 if entry["state"] == member.value else 0)
    yield up
    yield state
    for name, key, documentation, unit, divisor in _WORKER_GAUGES:
        gauge = GaugeMetricFamily(name, documentation, labels=["worker"], unit=unit)
        for entry in workers:
            value = _by_key(entry).get(key)
            if value is not None:
                gauge.add_metric([str(entry["id"])], value / divisor if divisor != 1 else value)
        yield gauge
