"""``/healthz`` and ``/readyz``: on their own, on a loop this test blocks; and a real master booting."""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import pytest

from bench.server import Server
from dispatcher.metrics import MetricsServer
from tests.test_metrics import canned_snapshot, on_loop, scrape, value

#: Headers every probe answer carries.
PROBE_HEADERS = {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"}


class Answer:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.body = response.read().decode()
        self.headers = dict(response.getheaders())


def probe(address: str, path: str, method: str = "GET", timeout: float = 10.0) -> Answer:
    """One request to the admin listener at ``address`` (``HOST:PORT``); any status is returned."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(method, path)
        return Answer(connection.getresponse())
    finally:
        connection.close()


def assert_probe(answer: Answer, status: int, body: str) -> None:
    assert (answer.status, answer.body) == (status, f"{body}\n")
    assert PROBE_HEADERS.items() <= answer.headers.items(), answer.headers


# The probes on their own: a readiness function on an event loop this test controls.


@pytest.fixture
def loop(loop_on_a_thread: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
    """The master's loop stands in running on a thread of its own; the test is the HTTP client."""
    return loop_on_a_thread


def admin(loop: asyncio.AbstractEventLoop, readiness: Callable[[], str | None],
          probe_timeout_s: float = 1.0) -> MetricsServer:
    server = MetricsServer(cast(Any, canned_snapshot), "127.0.0.1:0", readiness=readiness,
                           probe_timeout_s=probe_timeout_s)
    on_loop(loop, server.start)
    return server


def test_probes_answer_from_the_loop_beside_unchanged_metrics(loop: asyncio.AbstractEventLoop) -> None:
    state: dict[str, Any] = {"reason": None, "threads": []}

    def readiness() -> str | None:
        state["threads"].append(threading.get_ident())
        if state["reason"] == "raise":
            raise RuntimeError("readiness broke")
        return cast(str | None, state["reason"])

    server = admin(loop, readiness)
    try:
        assert_probe(probe(server.address, "/healthz"), 200, "ok")
        assert_probe(probe(server.address, "/readyz"), 200, "ready")
        loop_thread = on_loop(loop, threading.get_ident)
        assert state["threads"] == [loop_thread]  # run on the loop, not on the HTTP thread
        state["reason"] = "no worker is ready"
        assert_probe(probe(server.address, "/readyz"), 503, "no worker is ready")
        assert_probe(probe(server.address, "/healthz"), 200, "ok")  # alive, not ready
        state["reason"] = "raise"
        assert_probe(probe(server.address, "/readyz"), 503, "readiness check failed: "
                     "RuntimeError('readiness broke')")
        head = probe(server.address, "/readyz", method="HEAD")
        assert (head.status, head.body) == (503, "")
        post = probe(server.address, "/healthz", method="POST")
        assert post.status == 405 and post.headers["Allow"] == "GET, HEAD"
        # /metrics, and every other path, is prometheus_client's app as before.
        families = scrape(server.address)
        assert value(families, "dispatcher_scrape_error") == 0
        assert value(families, "dispatcher_redispatched") == 1
        other = probe(server.address, "/anything")
        assert other.status == 200 and "dispatcher_scrape_error 0.0" in other.body
    finally:
        server.close()


def test_probes_answer_503_while_the_loop_is_blocked(loop: asyncio.AbstractEventLoop) -> None:
    server = admin(loop, lambda: None, probe_timeout_s=0.3)
    blocked, release = threading.Event(), threading.Event()

    def block() -> None:
        blocked.set()
        release.wait(10)

    try:
        loop.call_soon_threadsafe(block)
        assert blocked.wait(5)
        for path in ("/healthz", "/readyz"):
            started = time.monotonic()
            assert_probe(probe(server.address, path), 503, "the master did not answer in 0.3 s")
            assert 0.3 <= time.monotonic() - started < 3
        release.set()
        # The loop is back: so are the answers (the timed-out calls were cancelled, not queued).
        assert_probe(probe(server.address, "/healthz"), 200, "ok")
        assert_probe(probe(server.address, "/readyz"), 200, "ready")
    finally:
        release.set()
        server.close()


# A real master: not ready while its only worker boots, ready once it has.


def test_readyz_is_503_until_a_worker_is_ready(server_factory: type[Server]) -> None:
    server = server_factory("--app", "tests.apps.slowboot:handler", "--metrics", "127.0.0.1:0",
                            env={"SLOWBOOT_SECONDS": "1.5"}, workers=1)
    # Logged before the first worker starts: it then takes 1.5 s to import the app.
    address = server.wait_line(r"metrics at http://(\S+)/metrics", timeout=10).group(1)
    assert_probe(probe(address, "/readyz"), 503, "no worker is ready")
    assert_probe(probe(address, "/healthz"), 200, "ok")
    server.start()
    assert server.metrics_address() == address
    assert_probe(probe(address, "/readyz"), 200, "ready")
    assert_probe(probe(address, "/healthz"), 200, "ok")
