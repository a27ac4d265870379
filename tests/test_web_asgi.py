"""ASGI apps (Starlette, FastAPI) served by real ``python -m dispatcher`` processes, to real clients.

httpx speaks HTTP/1.1 to them (keep-alive, chunked bodies both ways, 10 MB
streamed each way, TLS), the ``websockets`` client speaks WebSocket. One
server with the default options serves most of the tests (module-scoped);
those that need other options have their own. Draining under a rolling
reload is in ``tests/test_web_reload.py``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import re
import signal
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from bench.server import HOST, Server
from tests.apps.web_asgi import body_of
from tests.helpers import wait_for

APP = "tests.apps.web_asgi:app"
#: Every client call's timeout: short, but far above what a request on an idle machine takes.
TIMEOUT_S = 10.0
MB10 = 10 * 1024 * 1024


@dataclass
class Web:
    server: Server
    folder: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server.port}"


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    """One server (2 workers, default options) for the tests that need nothing else."""
    folder = tmp_path_factory.mktemp("web-asgi")
    server = Server("--app", APP, workers=2, env={"WEB_TEST_DIR": str(folder)})
    try:
        server.start()
        yield Web(server, folder)
    finally:
        server.kill()


def test_keep_alive_serves_several_requests_on_one_connection(web: Web) -> None:
    with httpx.Client(base_url=web.url, timeout=TIMEOUT_S) as client:
        answers = [client.get("/echo") for _ in range(5)]
    assert all(r.status_code == 200 and r.http_version == "HTTP/1.1" for r in answers)
    bodies = [r.json() for r in answers]
    # One connection: the same client port every time, so the same worker.
    assert len({tuple(b["client"]) for b in bodies}) == 1, bodies
    assert len({b["pid"] for b in bodies}) == 1
    assert bodies[0]["pid"] in web.server.worker_pids()
    assert all(r.headers.get("connection") != "close" for r in answers)
    # uvicorn's default headers.
    assert answers[0].headers["server"] == "uvicorn"
    assert re.fullmatch(r"\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} GMT", answers[0].headers["date"])


def test_query_string_headers_and_lifespan_state_reach_the_app(web: Web) -> None:
    answer = httpx.get(f"{web.url}/echo?a=1&b=x%20y&a=2&empty=", headers={"X-Custom": "some value"},
                       timeout=TIMEOUT_S)
    body = answer.json()
    assert body["query"] == [["a", "1"], ["b", "x y"], ["a", "2"], ["empty", ""]]
    assert body["headers"]["x-custom"] == "some value"
    assert body["headers"]["host"] == f"{HOST}:{web.server.port}"
    assert body["path"] == "/echo" and body["root_path"] == "" and body["scheme"] == "http"
    assert body["http_version"] == "1.1"
    # The lifespan ran in the worker that answers, and its state reached the request.
    assert body["started_by"] == body["pid"]
    assert body["token"] == "set in the lifespan startup"


def _chunks(total: int, size: int = 65536) -> Iterator[bytes]:
    for start in range(0, total, size):
        yield bytes((start // size) % 256 for _ in range(min(size, total - start)))


def test_chunked_request_body_of_10_mb_is_streamed_to_the_app(web: Web) -> None:
    expected = hashlib.sha256()
    for chunk in _chunks(MB10):
        expected.update(chunk)
    with httpx.Client(base_url=web.url, timeout=TIMEOUT_S) as client:
        # A generator body: httpx sends it chunked, as it is made.
        small = client.post("/upload", content=iter([b"hello ", b"chunked ", b"world"])).json()
        big = client.post("/upload", content=_chunks(MB10)).json()
    assert small["transfer_encoding"] == "chunked"
    assert small["bytes"] == 19 and small["sha256"] == hashlib.sha256(b"hello chunked world").hexdigest()
    assert big["transfer_encoding"] == "chunked"
    assert big["bytes"] == MB10 and big["sha256"] == expected.hexdigest()
    assert big["chunks"] > 10  # the app read it piece by piece, not as one buffer


def test_chunked_response_body_of_10_mb_is_streamed_to_the_client(web: Web) -> None:
    expected = hashlib.sha256()
    for block in body_of(MB10):
        expected.update(block)
    digest = hashlib.sha256()
    size = pieces = 0
    with httpx.Client(base_url=web.url, timeout=TIMEOUT_S) as client, \
            client.stream("GET", f"/download?n={MB10}") as response:
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in response.headers
        for piece in response.iter_raw(65536):
            digest.update(piece)
            size += len(piece)
            pieces += 1
    assert size == MB10 and digest.hexdigest() == expected.hexdigest()
    assert pieces > 10


def test_proxy_headers_from_an_allowed_address_are_trusted(web: Web) -> None:
    # The client is 127.0.0.1, trusted by the default --forwarded-allow-ips.
    body = httpx.get(f"{web.url}/echo", timeout=TIMEOUT_S,
                     headers={"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}).json()
    assert body["client"][0] == "203.0.113.7"
    assert body["scheme"] == "https"


def test_websocket_echoes(web: Web) -> None:
    with connect(f"ws://{HOST}:{web.server.port}/ws", open_timeout=TIMEOUT_S, close_timeout=TIMEOUT_S) as ws:
        for text in ("hello", "é" * 1000, "x" * 70000):
            ws.send(text)
            assert ws.recv(timeout=TIMEOUT_S) == text
        ws.send("pid")
        assert int(ws.recv(timeout=TIMEOUT_S)) in web.server.worker_pids()


def test_access_log_names_the_worker(web: Web) -> None:
    marker = f"/echo?access-log-{time.monotonic_ns()}"
    pid = httpx.get(web.url + marker, timeout=TIMEOUT_S).json()["pid"]
    web.server.sync_log()
    lines = [line for line in web.server.lines if marker in line]
    assert len(lines) == 1, web.server.log
    assert re.search(rf"\[{pid}\] \[worker [01]\] INFO .*\"GET {re.escape(marker)} HTTP/1.1\" 200", lines[0])


def test_options_root_path_untrusted_proxy_no_access_log(server_factory: type[Server]) -> None:
    server = server_factory("--app", APP, "--root-path", "/api", "--forwarded-allow-ips", "10.1.2.3",
                            "--no-access-log", workers=2).start()
    url = f"http://{HOST}:{server.port}"
    # As uvicorn: the proxy strips /api; the app sees it as the root path, and prefixed to the path.
    body = httpx.get(f"{url}/echo?q=1", headers={"X-Forwarded-For": "203.0.113.7"},
                     timeout=TIMEOUT_S).json()
    assert body["root_path"] == "/api"
    assert body["path"] == "/api/echo"
    assert body["query"] == [["q", "1"]]
    # 127.0.0.1 is not 10.1.2.3: its X-Forwarded-For is not believed.
    assert body["client"][0] == "127.0.0.1"
    assert body["scheme"] == "http"
    server.sync_log()
    assert not [line for line in server.lines if "/echo?q=1" in line], server.log


def test_limit_concurrency_answers_503_beyond_it(server_factory: type[Server], tmp_path: Path) -> None:
    server = server_factory("--app", APP, "--limit-concurrency", "2", workers=1).start()
    gate = tmp_path / "gate"

    def held(n: int) -> tuple[int, str]:
        conn = http.client.HTTPConnection(HOST, server.port, timeout=TIMEOUT_S)
        try:
            conn.request("GET", f"/wait?gate={gate}&arrived={tmp_path / f'arrived-{n}'}")
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(held, 1)
        wait_for(lambda: (tmp_path / "arrived-1").exists(), TIMEOUT_S, "the first request arrived")
        # uvicorn counts the connection that asks: the second one is at the limit, or within it.
        second = pool.submit(held, 2)
        wait_for(lambda: second.done() or (tmp_path / "arrived-2").exists(), TIMEOUT_S,
                 "the second request answered or arrived")
        third = pool.submit(held, 3)
        # Beyond the limit: answered at once, without waiting for the gate.
        status, text = third.result(timeout=TIMEOUT_S)
        assert status == 503, text
        assert not (tmp_path / "arrived-3").exists()
        gate.touch()
        assert first.result(timeout=TIMEOUT_S)[0] == 200
        assert second.result(timeout=TIMEOUT_S)[0] in (200, 503)
    assert httpx.get(f"http://{HOST}:{server.port}/", timeout=TIMEOUT_S).status_code == 200


def test_tls_with_a_certificate_made_now_and_a_factory_app(server_factory: type[Server],
                                                           tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert(HOST)
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    server = server_factory("--app", "tests.apps.web_asgi:create_app", "--factory",
                            "--ssl-certfile", str(certfile), "--ssl-keyfile", str(keyfile), workers=2).start()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with httpx.Client(base_url=f"https://{HOST}:{server.port}", verify=context, timeout=TIMEOUT_S) as client:
        index = client.get("/")
        echo = client.get("/echo").json()
    assert index.status_code == 200 and index.json()["factory"] is True
    assert echo["scheme"] == "https"
    with connect(f"wss://{HOST}:{server.port}/ws", ssl=context, open_timeout=TIMEOUT_S,
                 close_timeout=TIMEOUT_S) as ws:
        ws.send("over TLS")
        assert ws.recv(timeout=TIMEOUT_S) == "over TLS"
    # Plain HTTP to the TLS port gets no HTTP answer.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{HOST}:{server.port}/", timeout=TIMEOUT_S)
    # A client that does not trust the test CA refuses the server.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://{HOST}:{server.port}/", timeout=TIMEOUT_S)


def test_fastapi_example(server_factory: type[Server]) -> None:
    server = server_factory("--app", "examples.fastapi_app:app", workers=2).start()
    workers = set(server.worker_pids())
    with httpx.Client(base_url=f"http://{HOST}:{server.port}", timeout=TIMEOUT_S) as client:
        answer = client.get("/")
    body: dict[str, Any] = answer.json()
    assert body["hello"] == "world" and body["worker_pid"] in workers
    assert body["lifespan_pid"] == body["worker_pid"]
    with connect(f"ws://{HOST}:{server.port}/ws", open_timeout=TIMEOUT_S, close_timeout=TIMEOUT_S) as ws:
        ws.send("echo me")
        assert ws.recv(timeout=TIMEOUT_S) == "echo me"


LIFESPAN_FAILURES = [
    ("tests.apps.web_asgi:failing", "auto", "the database is unreachable on purpose"),
    ("tests.apps.web_asgi:no_lifespan", "on", "lifespan is not for this app"),
]


@pytest.mark.parametrize(("spec", "lifespan", "error"), LIFESPAN_FAILURES)
def test_failing_lifespan_startup_stops_the_master(server_factory: type[Server], spec: str, lifespan: str,
                                                   error: str) -> None:
    server = server_factory("--app", spec, "--lifespan", lifespan, workers=2)
    assert server.wait(timeout=TIMEOUT_S) == 3
    master = [line for line in server.lines if "[master] ERROR" in line and error in line]
    assert master and all(spec in line and "lifespan startup failed" in line for line in master), server.log


@pytest.mark.parametrize(("spec", "lifespan", "error"), LIFESPAN_FAILURES)
def test_failing_lifespan_startup_is_one_log_line(server_factory: type[Server], spec: str, lifespan: str,
                                                  error: str) -> None:
    server = server_factory("--app", spec, "--lifespan", lifespan, workers=2)
    assert server.wait(timeout=TIMEOUT_S) == 3
    lines = [line for line in server.lines if error in line]
    assert len(lines) == 1, server.log
    assert spec in lines[0] and "lifespan" in lines[0]
    assert "Traceback" not in server.log


def test_an_app_without_lifespan_serves_under_auto(server_factory: type[Server]) -> None:
    server = server_factory("--app", "tests.apps.web_asgi:no_lifespan", workers=1).start()
    assert httpx.get(f"http://{HOST}:{server.port}/", timeout=TIMEOUT_S).text == str(server.worker_pids()[0])


MISMATCHES = [
    ("tests.apps.web_asgi:app", "wsgi", "--interface wsgi needs def app(environ, start_response)"),
    ("tests.apps.web_wsgi:app", "asgi", "--interface asgi needs async def app(scope, receive, send)"),
]


@pytest.mark.parametrize(("spec", "interface", "message"), MISMATCHES)
def test_an_app_of_the_other_interface_is_refused(server_factory: type[Server], spec: str, interface: str,
                                                  message: str) -> None:
    server = server_factory("--app", spec, "--interface", interface, workers=2)
    assert server.wait(timeout=TIMEOUT_S) == 4
    lines = [line for line in server.lines if message in line]
    assert len(lines) == 1, server.log
    assert spec in lines[0]
    assert "Traceback" not in server.log


def test_a_graceful_stop_closes_websockets_with_1012_and_runs_the_lifespan_shutdown(
        server_factory: type[Server], tmp_path: Path) -> None:
    server = server_factory("--app", APP, workers=2, env={"WEB_TEST_DIR": str(tmp_path)}).start()
    workers = set(server.worker_pids())
    with connect(f"ws://{HOST}:{server.port}/ws", open_timeout=TIMEOUT_S, close_timeout=TIMEOUT_S) as ws:
        ws.send("pid")
        assert int(ws.recv(timeout=TIMEOUT_S)) in workers
        server.signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT_S)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    assert server.wait(timeout=TIMEOUT_S) == 0
    assert all((tmp_path / f"shutdown-{pid}").exists() for pid in workers)
