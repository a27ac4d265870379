"""WSGI apps (Flask) served by real ``python -m dispatcher`` processes, to httpx.

A response body that is an iterable arrives as it is made, in chunks, and
its ``close()`` is called; a chunked request body reaches ``wsgi.input``;
keep-alive, the root path as ``SCRIPT_NAME``, uvicorn's headers. The Flask
example is served too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.server import HOST, Server
from tests.helpers import wait_for

APP = "tests.apps.web_wsgi:app"
TIMEOUT_S = 10.0


@dataclass
class Web:
    server: Server

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server.port}"


@pytest.fixture(scope="module")
def web() -> Iterator[Web]:
    """One server (2 workers, 4 threads each, --root-path /app) for this module's tests."""
    server = Server("--app", APP, "--threads", "4", "--root-path", "/app", workers=2)
    try:
        server.start()
        yield Web(server)
    finally:
        server.kill()


def test_keep_alive_headers_and_script_name(web: Web) -> None:
    with httpx.Client(base_url=web.url, timeout=TIMEOUT_S) as client:
        answers = [client.get("/") for _ in range(4)]
    assert all(r.status_code == 200 for r in answers)
    bodies = [r.json() for r in answers]
    assert len({b["pid"] for b in bodies}) == 1 and bodies[0]["pid"] in web.server.worker_pids()
    assert bodies[0]["script_name"] == "/app"
    assert answers[0].headers["server"] == "uvicorn" and "date" in answers[0].headers


def test_a_generator_response_is_streamed_and_closed(web: Web, tmp_path: Path) -> None:
    gate, closed = tmp_path / "gate", tmp_path / "closed"
    with httpx.Client(base_url=web.url, timeout=TIMEOUT_S) as client, \
            client.stream("GET", f"/stream?count=5&gate={gate}&closed={closed}") as response:
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"
        lines = response.iter_lines()
        # The first chunk arrives while the app still waits for the gate: it was sent as it was made.
        assert next(lines).startswith("chunk 0 from ")
        assert not closed.exists()
        gate.touch()
        rest = list(lines)
    assert rest == [f"chunk {n}" for n in range(1, 5)]
    wait_for(closed.exists, TIMEOUT_S, "the response iterable's close() was called")


def test_a_chunked_upload_reaches_wsgi_input(web: Web) -> None:
    blocks = [bytes([n]) * 65536 for n in range(32)]  # 2 MiB, sent chunked as it is made
    expected = hashlib.sha256(b"".join(blocks)).hexdigest()
    body = httpx.post(f"{web.url}/upload", content=iter(blocks), timeout=TIMEOUT_S).json()
    assert body["bytes"] == 32 * 65536 and body["sha256"] == expected


def test_flask_example(server_factory: type[Server]) -> None:
    server = server_factory("--app", "examples.flask_app:app", "--threads", "2", workers=2).start()
    workers = set(server.worker_pids())
    with httpx.Client(base_url=f"http://{HOST}:{server.port}", timeout=TIMEOUT_S) as client:
        hello = client.get("/").json()
        with client.stream("GET", "/stream") as response:
            assert response.headers["transfer-encoding"] == "chunked"
            text = response.read().decode()
    assert hello["hello"] == "world" and hello["worker_pid"] in workers
    assert text == "".join(f"chunk {n}\n" for n in range(5))
