"""A rolling reload (``ctl reload``) of an ASGI app: how old workers drain, and that no client sees it.

An old worker, once its replacement is ready, takes nothing more and
finishes what it has: a request in flight is answered with
``Connection: close``, an idle keep-alive connection is closed at once (not
after ``--timeout-keep-alive``), a WebSocket is closed with 1012 (service
restart), then the lifespan shutdown runs. Clients that open a connection
per request, and keep-alive clients that retry once a request that failed
on a reused connection (as browsers do), see no failure through a reload. A
release whose lifespan startup fails stops the reload; the old workers keep
serving.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from bench.server import HOST, Server
from dispatcher.ctl import CtlError
from tests.helpers import app_env, wait_for

APP = "tests.apps.web_asgi:app"
TIMEOUT_S = 10.0
#: How long a reload of two workers may take here (each new one boots, then the old one drains).
RELOAD_TIMEOUT_S = 30.0


def _get(conn: http.client.HTTPConnection, path: str) -> tuple[http.client.HTTPResponse, dict[str, Any]]:
    """One request on ``conn``: the response (read to its end) and its JSON body."""
    conn.request("GET", path)
    response = conn.getresponse()
    body: dict[str, Any] = json.loads(response.read())
    return response, body


def test_reload_drains_requests_idle_connections_and_websockets(server_factory: type[Server],
                                                               tmp_path: Path) -> None:
    # A keep-alive timeout far longer than the test: an idle connection closed now was closed by the drain.
    server = server_factory("--app", APP, "--timeout-keep-alive", "60", workers=2,
                            env={"WEB_TEST_DIR": str(tmp_path)}).start()
    old = set(server.worker_pids())
    gate, arrived = tmp_path / "gate", tmp_path / "arrived"

    ws = connect(f"ws://{HOST}:{server.port}/ws", open_timeout=TIMEOUT_S, close_timeout=TIMEOUT_S)
    idle = http.client.HTTPConnection(HOST, server.port, timeout=TIMEOUT_S)
    busy = http.client.HTTPConnection(HOST, server.port, timeout=TIMEOUT_S)
    with ws, concurrent.futures.ThreadPoolExecutor(1) as pool:
        ws.send("pid")
        ws_pid = int(ws.recv(timeout=TIMEOUT_S))
        idle_pid = _get(idle, "/")[1]["pid"]
        in_flight = pool.submit(_get, busy, f"/wait?gate={gate}&arrived={arrived}")
        wait_for(arrived.exists, TIMEOUT_S, "the request in flight arrived")
        busy_pid = int(arrived.read_text())
        assert {ws_pid, idle_pid, busy_pid} <= old

        started = time.monotonic()
        assert server.request("reload", timeout_s=RELOAD_TIMEOUT_S) == {"reloaded": 2}
        # The answer comes once both replacements are ready; the old worker drains on its own clock.
        server.wait_line(rf"\[{busy_pid}\] \[worker \d+\] INFO draining", timeout=TIMEOUT_S)
        gate.touch()
        response, body = in_flight.result(timeout=TIMEOUT_S)
        assert response.status == 200 and body["pid"] == busy_pid and body["gated"]
        assert response.getheader("connection") == "close"

        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT_S)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012

        assert idle.sock is not None
        idle.sock.settimeout(TIMEOUT_S)
        assert idle.sock.recv(1) == b""  # closed by the server (a timeout would raise)
        assert time.monotonic() - started < RELOAD_TIMEOUT_S
    idle.close()
    busy.close()

    for pid in old:
        wait_for((tmp_path / f"shutdown-{pid}").exists, TIMEOUT_S, f"the lifespan shutdown of {pid} ran")
    wait_for(lambda: not old & set(server.worker_pids()), TIMEOUT_S, "the old workers exited")
    with connect(f"ws://{HOST}:{server.port}/ws", open_timeout=TIMEOUT_S, close_timeout=TIMEOUT_S) as again:
        again.send("pid")
        assert int(again.recv(timeout=TIMEOUT_S)) not in old
        again.send("still echoing")
        assert again.recv(timeout=TIMEOUT_S) == "still echoing"



def test_reload_to_a_release_whose_lifespan_fails_keeps_the_old_workers(server_factory: type[Server],
                                                                       tmp_path: Path) -> None:
    module = tmp_path / "webrelease.py"
    module.write_text("from tests.apps.web_asgi import app\n")
    server = server_factory("--app", "webrelease:app", workers=2, env=app_env(tmp_path)).start()
    old = set(server.worker_pids())
    module.write_text("from tests.apps.web_asgi import failing as app\n")
    with pytest.raises(CtlError, match=r"reload failed: .*lifespan startup failed: "
                                       r"RuntimeError: the database is unreachable on purpose"):
        server.request("reload", timeout_s=RELOAD_TIMEOUT_S)
    assert server.proc.poll() is None
    assert {w["pid"] for w in server.status()["workers"]} == old
    with httpx.Client(base_url=f"http://{HOST}:{server.port}", timeout=TIMEOUT_S) as client:
        served = {client.get("/", headers={"Connection": "close"}).json()["pid"] for _ in range(6)}
    assert served == old


@dataclass
class Outcomes:
    """What the clients of one kind saw: the pid that answered each request, and each failure."""

    pids: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    retries: int = 0

    @property
    def ok(self) -> int:
        return sum(self.pids.values())


class ReloadLoad:
    """Client threads of two kinds, each request a ``GET /`` whose answer names the worker's pid.

    ``fresh``: httpx, ``Connection: close`` on every request, so a new
    connection each time. ``keep-alive``: one ``http.client`` connection per
    thread, used for request after request; a request that fails with a
    connection error on a connection that had served one before is retried
    once on a new one (a request on a new connection is never retried).
    Bounded in time (``max_seconds``).
    """

    def __init__(self, port: int, threads_per_kind: int = 2, max_seconds: float = 20.0) -> None:
        self.port = port
        self.outcomes = {"fresh": Outcomes(), "keep-alive": Outcomes()}
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_seconds
        self._threads = [threading.Thread(target=target, daemon=True)
                         for target in (self._fresh, self._keep_alive) for _ in range(threads_per_kind)]

    def __enter__(self) -> ReloadLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(TIMEOUT_S + 5)
        assert not any(thread.is_alive() for thread in self._threads)

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._deadline

    def _record(self, kind: str, pid: int | None = None, failure: str = "", retried: bool = False) -> None:
        with self._lock:
            outcome = self.outcomes[kind]
            if pid is not None:
                outcome.pids[pid] += 1
            if failure:
                outcome.failures.append(failure)
            outcome.retries += retried
            self._lock.notify_all()

    def _fresh(self) -> None:
        with httpx.Client(base_url=f"http://{HOST}:{self.port}", timeout=TIMEOUT_S,
                          headers={"Connection": "close"}) as client:
            while self._running():
                try:
                    response = client.get("/")
                    response.raise_for_status()
                    self._record("fresh", pid=response.json()["pid"])
                except (httpx.HTTPError, ValueError) as exc:
                    self._record("fresh", failure=repr(exc))

    def _keep_alive(self) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=TIMEOUT_S)
        try:
            while self._running():
                reused = conn.sock is not None
                try:
                    response, body = _get(conn, "/")
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    if not reused:
                        self._record("keep-alive", failure=f"on a new connection: {exc!r}")
                        continue
                    try:
                        response, body = _get(conn, "/")
                    except (OSError, http.client.HTTPException) as again:
                        conn.close()
                        self._record("keep-alive", failure=f"{exc!r}, then on a new connection: {again!r}")
                        continue
                    self._record("keep-alive", retried=True)
                if response.status != 200:
                    self._record("keep-alive", failure=f"HTTP {response.status}")
                else:
                    self._record("keep-alive", pid=body["pid"])
        finally:
            conn.close()

    def wait_each(self, count: int, pids: set[int] | None = None, timeout: float = TIMEOUT_S) -> None:
        """Until each kind has ``count`` more answers (from ``pids`` only, if given)."""

        def served() -> dict[str, int]:
            return {kind: sum(n for pid, n in o.pids.items() if pids is None or pid in pids)
                    for kind, o in self.outcomes.items()}

        with self._lock:
            target = {kind: n + count for kind, n in served().items()}
            if not self._lock.wait_for(lambda: all(served()[k] >= target[k] for k in target), timeout):
                raise TimeoutError(f"load stalled: {self.outcomes}")


def test_no_client_sees_a_reload_under_load(server_factory: type[Server]) -> None:
    server = server_factory("--app", APP, workers=2).start()
    old = set(server.worker_pids())
    with ReloadLoad(server.port) as load:
        load.wait_each(30, pids=old)
        assert server.request("reload", timeout_s=RELOAD_TIMEOUT_S) == {"reloaded": 2}
        new = {w["pid"] for w in server.status()["workers"] if w["pid"] is not None}
        assert not new & old
        load.wait_each(30, pids=new)
    for kind, outcome in load.outcomes.items():
        assert outcome.failures == [], (kind, outcome.failures[:5])
        assert set(outcome.pids) & old and set(outcome.pids) & new, (kind, outcome.pids, old, new)
        assert set(outcome.pids) <= old | new
    print(f"served {dict((k, o.ok) for k, o in load.outcomes.items())}, "
          f"keep-alive retries {load.outcomes['keep-alive'].retries}")
