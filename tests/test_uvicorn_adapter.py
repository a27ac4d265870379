"""worker.uvicorn_adapter: uvicorn's protocols serving sockets accepted by the test, with real clients.

Two parts. The contract tests check each uvicorn internal the adapter touches and say which one changed
when uvicorn does. The behaviour tests go through the public API only: a listening socket of the test's,
``loop.sock_accept`` here, every accepted socket handed to ``EmbeddedServer.serve``, and httpx, the
websockets client or a raw stream (for the byte-exact drain cases) on the other end.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gc
import inspect
import io
import json
import logging
import os
import socket
import ssl
import sys
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import a2wsgi
import httpx
import pytest
import trustme
import uvicorn
import uvloop
import websockets
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from uvicorn.config import Config
from uvicorn.importer import ImportFromStringError
from uvicorn.lifespan.off import LifespanOff
from uvicorn.lifespan.on import LifespanOn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol
from uvicorn.server import ServerState
from websockets.asyncio.client import connect as ws_connect

from shared.web_options import WebOptions
from worker.uvicorn_adapter import (
    UVICORN_VERSIONS,
    EmbeddedServer,
    LifespanFailed,
    check_version,
    version_in_range,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # uvicorn deprecates its legacy websockets implementation
    from uvicorn.protocols.websockets.websockets_impl import WebSocketProtocol

T = TypeVar("T")
HOST = "127.0.0.1"
TEST_TIMEOUT_S = 10.0  # a whole test's scenario
WAIT_S = 3.0  # any single wait inside one
HTTP_IMPLS = ["h11", "httptools"]
WS_IMPLS = ["websockets-sansio", "wsproto", "websockets"]
HTTP_CLASSES = [H11Protocol, HttpToolsProtocol]
WS_CLASSES = [WSProtocol, WebSocketsSansIOProtocol, WebSocketProtocol]
# uvicorn's deprecated --ws websockets hands websockets' legacy server a two-argument handler.
LEGACY_WS_WARNING = "ignore:remove second argument of ws_handler:DeprecationWarning"


def run(scenario: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    """Run one test's scenario in a fresh loop (asyncio's or uvloop's), bounded as a whole."""
    factory = uvloop.new_event_loop if loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(scenario, TEST_TIMEOUT_S))


async def within(awaitable: Awaitable[T], seconds: float = WAIT_S) -> T:
    return await asyncio.wait_for(awaitable, seconds)


async def until(predicate: Callable[[], bool], what: str, seconds: float = WAIT_S) -> None:
    """For state with no event to await (a count inside the server): check until true."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.01)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="session")
def uvloop_warmed() -> None:
    """uvloop opens a pipe of its own, once a process, with its first loop: not a leak of ours."""
    run(asyncio.sleep(0), "uvloop")


@pytest.fixture(autouse=True)
def no_fd_leak(uvloop_warmed: None) -> Iterator[None]:
    """Every test opens and closes connections: none may leave a descriptor behind."""
    gc.collect()  # what an earlier test left for the collector is not this test's
    before = fd_count()
    yield
    gc.collect()
    assert fd_count() == before, "file descriptors leaked"


# --- apps ---------------------------------------------------------------------------------------------


class App:
    """A raw ASGI app: reports its scope as JSON; /slow waits for ``release``; /ws echoes; full lifespan."""

    def __init__(self) -> None:
        self.slow_started = asyncio.Event()
        self.release = asyncio.Event()
        self.lifespan: list[str] = []
        self.ws_disconnect_code: int | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    scope["state"]["greeting"] = "hello"
                    self.lifespan.append("startup")
                    await send({"type": "lifespan.startup.complete"})
                else:
                    self.lifespan.append("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    self.ws_disconnect_code = message["code"]
                    return
                await send({"type": "websocket.send", "text": message["text"]})
        else:
            if scope["path"].endswith("/slow"):
                self.slow_started.set()
                await self.release.wait()
            body = json.dumps({
                "path": scope["path"], "root_path": scope["root_path"], "client": scope["client"],
                "scheme": scope["scheme"], "state": dict(scope.get("state", {})),
            }).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


def starlette_app(fail_with: str | None = None) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        if fail_with is not None:
            raise RuntimeError(fail_with)
        yield {"greeting": "from the lifespan"}

    async def greet(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.state.greeting)

    return Starlette(routes=[Route("/", greet)], lifespan=lifespan)


async def http_only(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An app that knows nothing of lifespan, as many hand-written ones."""
    if scope["type"] != "http":
        raise ValueError(f"unsupported scope type {scope['type']}")
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body"})


# --- the harness --------------------------------------------------------------------------------------


class Served:
    """An EmbeddedServer behind the test's listening socket: each accepted socket goes to serve()."""

    def __init__(self, app: Any, options: WebOptions | None = None, *, wsgi: bool = False,
                 client: Any = None) -> None:
        self.server = EmbeddedServer(app, options or WebOptions(), worker_id=7, wsgi=wsgi)
        self.client = client  # what serve() is told the client is (a PROXY protocol header's)
        self.listener = socket.create_server((HOST, 0))
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def __aenter__(self) -> Served:
        await self.server.startup()
        self.accepting = asyncio.create_task(self._accept())
        return self

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self.listener)
            self.server.serve(sock, client=self.client)

    async def __aexit__(self, *exc: object) -> None:
        self.accepting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.accepting
        self.listener.close()
        self.server.drain(0)
        await self.server.wait_closed(WAIT_S)
        await self.server.shutdown(WAIT_S)
        self.server.close()
        assert self.server.open_connections == 0

    async def raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A client connection, once the server counts it as open."""
        before = self.server.open_connections
        reader, writer = await within(asyncio.open_connection(HOST, self.port))
        await until(lambda: self.server.open_connections > before, "the server never saw the connection")
        return reader, writer


def get(path: str = "/") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await within(reader.readuntil(b"\r\n\r\n"))).decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await within(reader.readexactly(int(headers.get("content-length", "0"))))
    return int(head[0].split()[1]), headers, body


async def closed_by_server(reader: asyncio.StreamReader, seconds: float = WAIT_S) -> bool:
    """The server closed this connection (EOF) within ``seconds``; False if it is still open then."""
    try:
        return await asyncio.wait_for(reader.read(), seconds) == b""
    except TimeoutError:
        return False


async def close_client(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await within(writer.wait_closed())


# --- contract tests: the uvicorn internals the adapter touches ------------------------------------------


async def client_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with ``scope["client"]``: over HTTP as the body, over a WebSocket as a text message."""
    if scope["type"] == "http":
        body = json.dumps(scope["client"]).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    elif scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": json.dumps(scope["client"])})
        await send({"type": "websocket.close"})


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize(("http", "ws"), [("h11", "wsproto"), ("httptools", "websockets-sansio")])
def test_the_client_given_to_serve_is_scope_client_the_access_log_and_a_websockets(
    loop: str, http: str, ws: str, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn's protocols take the client from the transport they are given in connection_made
    (its ``socket`` extra's getpeername(), else ``peername``), and hand a WebSocket the same one."""
    caplog.set_level(logging.INFO, "uvicorn.access")

    async def scenario() -> tuple[Any, Any]:
        options = WebOptions(http=http, ws=ws, lifespan="off")
        async with Served(client_app, options, client=("203.0.113.7", 4711)) as served:
            reader, writer = await served.raw()
            writer.write(get())
            _, _, body = await read_response(reader)
            await close_client(writer)
            async with ws_connect(f"ws://{HOST}:{served.port}/") as ws_client:
                message = await within(ws_client.recv())
        return json.loads(body), json.loads(message)

    assert run(scenario(), loop) == (["203.0.113.7", 4711], ["203.0.113.7", 4711])
    assert any('203.0.113.7:4711 - "GET / HTTP/1.1" 200' in record.getMessage() for record in caplog.records)


def test_installed_uvicorn_is_in_the_tested_range() -> None:
    assert version_in_range(uvicorn.__version__), (
        f"uvicorn {uvicorn.__version__} is outside UVICORN_VERSIONS {UVICORN_VERSIONS}: re-check every "
        "internal listed in worker/uvicorn_adapter.py's docstring, then widen the range")
    assert check_version() is None
    assert not version_in_range("0.55.1") and not version_in_range("0.53")
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # the adapter's own comparison is all there is to go by
        return
    assert uvicorn.__version__ in SpecifierSet(UVICORN_VERSIONS)
    for version in ("0.53.9", "0.54.0", "0.54.7", "0.55.0", "0.55", "1.0.0"):
        assert version_in_range(version) == (version in SpecifierSet(UVICORN_VERSIONS)), version


def test_server_state_has_the_shared_sets_and_default_headers() -> None:
    state = ServerState()
    for name, kind in (("connections", set), ("tasks", set), ("default_headers", list)):
        assert isinstance(getattr(state, name, None), kind), (
            f"uvicorn.server.ServerState.{name} is no longer a {kind.__name__}: the adapter counts "
            "connections, waits for tasks and refreshes default headers through it")


def test_config_load_sets_what_the_adapter_reads() -> None:
    probes: list[tuple[Any, ...]] = []

    class RecordsCalls:
        def __call__(self, *args: Any) -> None:
            probes.append(args)
            raise TypeError("not a factory")

    config = Config(RecordsCalls(), log_config=None, interface="asgi3", factory=False, http="h11",
                    ws="wsproto", lifespan="on", proxy_headers=False)
    config.load()
    assert probes == [()], "Config.load() no longer probes the app with a no-argument call; " \
        "the adapter's wrapper exists to make that probe harmless"
    for name in ("loaded_app", "http_protocol_class", "ws_protocol_class", "lifespan_class", "ssl",
                 "encoded_headers", "date_header"):
        assert hasattr(config, name), f"uvicorn Config has no {name!r} after load(); the adapter reads it"
    assert config.http_protocol_class is H11Protocol
    assert config.ws_protocol_class is WSProtocol
    assert config.lifespan_class is LifespanOn
    assert config.ssl is None
    assert config.encoded_headers == [(b"server", b"uvicorn")], "Config.encoded_headers changed shape"
    unloadable = Config(RecordsCalls(), log_config=None, interface="asgi3", http="no_such_module:Protocol")
    with pytest.raises(ImportFromStringError):
        unloadable.load()


@pytest.mark.parametrize("protocol_class", HTTP_CLASSES + WS_CLASSES, ids=lambda cls: cls.__name__)
def test_protocol_classes_take_the_keywords_and_shut_down(protocol_class: type) -> None:
    parameters = inspect.signature(protocol_class).parameters
    for keyword in ("config", "server_state", "app_state", "_loop"):
        assert keyword in parameters, f"{protocol_class.__name__}() no longer takes {keyword}="
    assert callable(getattr(protocol_class, "shutdown", None)), f"{protocol_class.__name__}.shutdown is gone"


@pytest.mark.parametrize("protocol_class", HTTP_CLASSES, ids=lambda cls: cls.__name__)
def test_http_protocol_cycle_is_none_until_the_first_request(protocol_class: type) -> None:
    async def scenario() -> None:
        config = Config(App(), log_config=None, interface="asgi3", lifespan="off", proxy_headers=False)
        config.load()
        state = ServerState()
        server_side, client_side = socket.socketpair()
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.connect_accepted_socket(
            lambda: protocol_class(config=config, server_state=state, app_state={}, _loop=loop),
            sock=server_side)
        reader, writer = await asyncio.open_connection(sock=client_side)
        assert protocol in state.connections, "a connected protocol is no longer in ServerState.connections"
        assert protocol.transport is transport, f"{protocol_class.__name__}.transport is not its transport"
        assert protocol.cycle is None, (
            f"{protocol_class.__name__}.cycle is not None before the first request: the adapter tells a "
            "connection that has had no request yet (given a grace on drain) by it")
        writer.write(get())
        status, _, _ = await read_response(reader)
        assert status == 200
        assert protocol.cycle is not None, f"{protocol_class.__name__}.cycle stays None after a request"
        protocol.shutdown()  # idle keep-alive: closes
        assert await closed_by_server(reader)
        await close_client(writer)
        await until(lambda: not state.connections, "the protocol never left ServerState.connections")

    run(scenario())


def test_lifespan_classes_have_state_should_exit_startup_and_shutdown() -> None:
    config = Config(App(), log_config=None, interface="asgi3", lifespan="on")
    config.load()
    for lifespan_class in (LifespanOn, LifespanOff):
        lifespan = lifespan_class(config)
        name = lifespan_class.__name__
        assert lifespan.state == {}, f"{name}.state is no longer a dict (the request scopes' state)"
        assert lifespan.should_exit is False, f"{name}.should_exit is gone (how startup failure is told)"
        for method in ("startup", "shutdown"):
            assert inspect.iscoroutinefunction(getattr(lifespan_class, method, None)), f"{name}.{method}"


# --- behaviour: HTTP --------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("http", HTTP_IMPLS)
def test_keep_alive_serves_two_requests_on_one_connection_with_date_and_server(http: str, loop: str) -> None:
    async def scenario() -> None:
        async with Served(App(), WebOptions(http=http)) as served, \
                httpx.AsyncClient(base_url=served.url, timeout=WAIT_S) as client:
            first, second = await client.get("/one"), await client.get("/two")
            assert (first.status_code, second.status_code) == (200, 200)
            assert first.json()["path"] == "/one" and second.json()["path"] == "/two"
            assert first.json()["client"] == second.json()["client"], "not the same connection"
            assert served.server.open_connections == 1
            assert first.headers["server"] == "uvicorn"
            sent = email.utils.parsedate_to_datetime(first.headers["date"]).timestamp()
            assert abs(sent - time.time()) < 5

    run(scenario(), loop)


def test_a_unix_socket_is_served_too() -> None:
    async def scenario() -> None:
        server = EmbeddedServer(App(), WebOptions(lifespan="off"), worker_id=1)
        await server.startup()
        server_side, client_side = socket.socketpair()
        server.serve(server_side)
        reader, writer = await within(asyncio.open_connection(sock=client_side))
        writer.write(get("/unix"))
        status, _, body = await read_response(reader)
        assert status == 200 and json.loads(body)["path"] == "/unix"
        server.drain(0)
        assert await closed_by_server(reader)
        await close_client(writer)
        await within(server.wait_closed(WAIT_S))
        await server.shutdown(WAIT_S)

    run(scenario())


def test_date_header_is_refreshed_every_second() -> None:
    async def scenario() -> None:
        async with Served(App()) as served, httpx.AsyncClient(base_url=served.url, timeout=WAIT_S) as client:
            first = (await client.get("/")).headers["date"]
            deadline = time.monotonic() + 2.5
            while (await client.get("/")).headers["date"] == first:
                assert time.monotonic() < deadline, "the date header was not refreshed"
                await asyncio.sleep(0.05)

    run(scenario())


def test_root_path_is_in_the_scope() -> None:
    async def scenario() -> None:
        async with Served(App(), WebOptions(root_path="/api")) as served, \
                httpx.AsyncClient(base_url=served.url, timeout=WAIT_S) as client:
            scope = (await client.get("/items")).json()
            assert scope["root_path"] == "/api"
            assert scope["path"] == "/api/items"

    run(scenario())


@pytest.mark.parametrize(("allow", "trusted"), [("127.0.0.1", True), ("10.0.0.1", False)])
def test_proxy_headers_are_trusted_only_from_forwarded_allow_ips(allow: str, trusted: bool) -> None:
    async def scenario() -> None:
        forwarded = {"x-forwarded-for": "203.0.113.7", "x-forwarded-proto": "https"}
        async with Served(App(), WebOptions(forwarded_allow_ips=allow)) as served, \
                httpx.AsyncClient(base_url=served.url, timeout=WAIT_S) as client:
            scope = (await client.get("/", headers=forwarded)).json()
            if trusted:
                assert (scope["client"][0], scope["scheme"]) == ("203.0.113.7", "https")
            else:
                assert (scope["client"][0], scope["scheme"]) == ("127.0.0.1", "http")

    run(scenario())


def test_limit_concurrency_answers_503() -> None:
    async def scenario() -> None:
        app = App()
        async with Served(app, WebOptions(limit_concurrency=2)) as served, \
                httpx.AsyncClient(base_url=served.url, timeout=WAIT_S) as client:
            slow = asyncio.create_task(client.get("/slow"))
            await within(app.slow_started.wait())
            refused = await client.get("/")  # a second connection: the limit counts the first
            assert refused.status_code == 503
            app.release.set()
            assert (await within(slow)).status_code == 200

    run(scenario())


@pytest.fixture
def tls(tmp_path: Path) -> tuple[WebOptions, ssl.SSLContext]:
    """Options serving TLS with a certificate made now by trustme, and a client context trusting it."""
    ca = trustme.CA()
    cert = ca.issue_cert(HOST)
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(certfile)
    cert.private_key_pem.write_to_path(keyfile)
    verify = ssl.create_default_context()
    ca.configure_trust(verify)
    return WebOptions(ssl_certfile=str(certfile), ssl_keyfile=str(keyfile)), verify


def test_tls(tls: tuple[WebOptions, ssl.SSLContext], caplog: pytest.LogCaptureFixture) -> None:
    options, verify = tls

    async def scenario() -> None:
        async with Served(App(), options) as served:
            async with httpx.AsyncClient(verify=verify, timeout=WAIT_S) as client:
                response = await client.get(f"https://{HOST}:{served.port}/secure")
                assert response.status_code == 200
                assert response.json()["scheme"] == "https"
            # Plain HTTP to the TLS port: the handshake fails; serve() logs it, closes, raises nothing
            # (Served checks that no serve() raised).
            reader, writer = await within(asyncio.open_connection(HOST, served.port))
            writer.write(get())
            with contextlib.suppress(ConnectionError):
                await within(reader.read())  # to EOF (after a TLS alert), or reset
            await close_client(writer)
            await until(lambda: served.server.open_connections == 0, "the failed handshake stayed open")

    with caplog.at_level(logging.DEBUG, logger="worker.uvicorn_adapter"):
        run(scenario())
    assert "connection from ('127.0.0.1'" in caplog.text
    assert "failed before serving" in caplog.text


def test_a_pending_handshake_counts_as_open_and_is_aborted(tls: tuple[WebOptions, ssl.SSLContext]) -> None:
    async def scenario() -> None:
        async with Served(App(), tls[0]) as served:
            reader, writer = await served.raw()  # and no ClientHello: serve() waits in the handshake
            assert served.server.open_connections == 1
            served.server.drain(0)
            await served.server.wait_closed(0.2)
            assert served.server.open_connections == 0
            assert await closed_by_server(reader)
            await close_client(writer)

    run(scenario())


def test_tls_files_that_cannot_be_loaded_are_a_value_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="--ssl-certfile") as raised:
        EmbeddedServer(App(), WebOptions(ssl_certfile=str(bad)), worker_id=1)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(("option", "package"), [
    ({"http": "httptools"}, "httptools"),
    ({"ws": "websockets"}, "websockets"),
    ({"ws": "wsproto"}, "wsproto"),
])
def test_a_protocol_whose_package_is_missing_is_a_value_error(
        monkeypatch: pytest.MonkeyPatch, option: dict[str, str], package: str) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # what an uninstalled package looks like to import
    with pytest.raises(ValueError, match=f"needs the '{package}' package") as raised:
        EmbeddedServer(App(), WebOptions(**option), worker_id=1)  # type: ignore[arg-type]
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("access_log", [True, False])
def test_access_lines_reach_the_root_handler_with_the_worker_id(access_log: bool) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[worker 7] %(levelname)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        # uvicorn turns access logging off for the whole process when a Config says so: one made
        # before must not silence this server's.
        EmbeddedServer(App(), WebOptions(access_log=False), worker_id=7).close()

        async def scenario() -> None:
            async with Served(App(), WebOptions(access_log=access_log)) as served, \
                    httpx.AsyncClient(base_url=served.url, timeout=WAIT_S) as client:
                assert (await client.get("/logged?x=1")).status_code == 200

        run(scenario())
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    access = [line for line in stream.getvalue().splitlines() if '"GET /logged?x=1 HTTP/1.1" 200' in line]
    if access_log:
        assert len(access) == 1 and access[0].startswith("[worker 7] INFO 127.0.0.1:"), stream.getvalue()
    else:
        assert access == [], stream.getvalue()


def test_wsgi_app_wrapped_by_a2wsgi() -> None:
    def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
        body = f"wsgi {environ['PATH_INFO']} {environ['SCRIPT_NAME']}".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    async def scenario() -> None:
        # lifespan "on" and a WebSocket library present: both are off for WSGI all the same.
        options = WebOptions(root_path="/app", lifespan="on", ws="websockets-sansio")
        async with Served(a2wsgi.WSGIMiddleware(wsgi_app), options, wsgi=True) as served:
            async with httpx.AsyncClient(base_url=served.url, timeout=WAIT_S) as client:
                response = await client.get("/hello")
                assert response.text == "wsgi /hello /app"
                assert response.headers["server"] == "uvicorn"
            with pytest.raises(websockets.exceptions.InvalidStatus):
                async with ws_connect(f"ws://{HOST}:{served.port}/ws", open_timeout=WAIT_S):
                    pass

    run(scenario())


# --- behaviour: WebSockets ----------------------------------------------------------------------------


@pytest.mark.filterwarnings(LEGACY_WS_WARNING)
@pytest.mark.parametrize("http", HTTP_IMPLS)
@pytest.mark.parametrize("ws", WS_IMPLS)
def test_websocket_echo_then_1012_on_drain(ws: str, http: str) -> None:
    async def scenario() -> None:
        app = App()
        async with Served(app, WebOptions(http=http, ws=ws)) as served:
            async with ws_connect(f"ws://{HOST}:{served.port}/ws", open_timeout=WAIT_S) as client:
                await client.send("hello")
                assert await within(client.recv()) == "hello"
                assert served.server.open_connections == 1
                served.server.drain(5.0)
                await within(client.wait_closed())
                assert client.close_code == 1012
            await within(served.server.wait_closed(WAIT_S))
            assert served.server.open_connections == 0
            await until(lambda: app.ws_disconnect_code is not None, "the app never heard of the close")
            assert app.ws_disconnect_code == 1012

    run(scenario())


# --- behaviour: drain ---------------------------------------------------------------------------------


@pytest.mark.parametrize("http", HTTP_IMPLS)
def test_drain_closes_idle_keep_alive_at_once(http: str) -> None:
    async def scenario() -> None:
        async with Served(App(), WebOptions(http=http)) as served:
            reader, writer = await served.raw()
            writer.write(get())
            status, headers, _ = await read_response(reader)
            assert status == 200 and "connection" not in headers  # kept alive
            served.server.drain(30.0)
            served.server.drain(30.0)  # idempotent
            assert await closed_by_server(reader, 1.0), "an idle keep-alive connection waited for the grace"
            await close_client(writer)
            await within(served.server.wait_closed(WAIT_S))

    run(scenario())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("http", HTTP_IMPLS)
def test_drain_gives_a_fresh_connection_the_grace_for_its_first_request(http: str, loop: str) -> None:
    async def scenario() -> None:
        async with Served(App(), WebOptions(http=http)) as served:
            reader, writer = await served.raw()
            served.server.drain(5.0)
            assert not await closed_by_server(reader, 0.2), "closed before its grace"
            writer.write(get("/late"))
            status, headers, body = await read_response(reader)
            assert status == 200 and json.loads(body)["path"] == "/late"
            assert headers["connection"] == "close"
            assert await closed_by_server(reader)
            await close_client(writer)
            await within(served.server.wait_closed(WAIT_S))

    run(scenario(), loop)


@pytest.mark.parametrize("http", HTTP_IMPLS)
def test_a_connection_made_after_drain_is_answered_with_connection_close(http: str) -> None:
    async def scenario() -> None:
        async with Served(App(), WebOptions(http=http)) as served:
            served.server.drain(5.0)
            reader, writer = await served.raw()
            writer.write(get("/after"))
            status, headers, _ = await read_response(reader)
            assert (status, headers["connection"]) == (200, "close")
            assert await closed_by_server(reader)
            await close_client(writer)

    run(scenario())


@pytest.mark.parametrize("http", HTTP_IMPLS)
def test_drain_closes_a_silent_connection_after_the_grace(http: str) -> None:
    async def scenario() -> None:
        async with Served(App(), WebOptions(http=http)) as served:
            reader, writer = await served.raw()
            started = time.monotonic()
            served.server.drain(0.3)
            assert await closed_by_server(reader)
            assert time.monotonic() - started >= 0.25, "closed before its grace was over"
            await close_client(writer)
            await within(served.server.wait_closed(WAIT_S))
            assert served.server.open_connections == 0

    run(scenario())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("http", HTTP_IMPLS)
def test_drain_lets_a_request_in_flight_finish_with_connection_close(http: str, loop: str) -> None:
    async def scenario() -> None:
        app = App()
        async with Served(app, WebOptions(http=http)) as served:
            reader, writer = await served.raw()
            writer.write(get("/slow"))
            await within(app.slow_started.wait())
            served.server.drain(5.0)
            waiting = asyncio.create_task(served.server.wait_closed(WAIT_S))
            app.release.set()
            status, headers, body = await read_response(reader)
            assert status == 200 and json.loads(body)["path"] == "/slow"
            assert headers["connection"] == "close"
            assert await closed_by_server(reader)
            await close_client(writer)
            await within(waiting)
            assert served.server.open_connections == 0

    run(scenario(), loop)


def test_wait_closed_aborts_what_is_left_after_its_timeout(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        app = App()
        async with Served(app) as served:
            reader, writer = await served.raw()
            writer.write(get("/slow"))
            await within(app.slow_started.wait())  # and never released
            served.server.drain(5.0)
            started = time.monotonic()
            await served.server.wait_closed(0.3)
            assert time.monotonic() - started < 2
            assert served.server.open_connections == 0
            with contextlib.suppress(ConnectionError):
                assert await within(reader.read()) == b""
            await close_client(writer)

    run(scenario())
    assert "1 connection(s) and 1 task(s) left after 0.3s: aborting them" in caplog.text


# --- behaviour: lifespan ------------------------------------------------------------------------------


def test_lifespan_state_reaches_the_request_scope() -> None:
    async def scenario() -> None:
        async with Served(starlette_app()) as served, \
                httpx.AsyncClient(base_url=served.url, timeout=WAIT_S) as client:
            assert (await client.get("/")).text == "from the lifespan"
        app = App()
        async with Served(app) as served, httpx.AsyncClient(base_url=served.url, timeout=WAIT_S) as client:
            assert (await client.get("/")).json()["state"] == {"greeting": "hello"}

    run(scenario())


def test_lifespan_shutdown_runs() -> None:
    async def scenario() -> None:
        app = App()
        async with Served(app):
            assert app.lifespan == ["startup"]
        assert app.lifespan == ["startup", "shutdown"]

    run(scenario())


def test_lifespan_shutdown_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    async def hangs_on_shutdown(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await asyncio.Event().wait()

    async def scenario() -> None:
        server = EmbeddedServer(hangs_on_shutdown, WebOptions(lifespan="on"), worker_id=3)
        await server.startup()
        started = time.monotonic()
        await server.shutdown(0.2)
        assert time.monotonic() - started < 1

    run(scenario())
    assert "lifespan shutdown took longer than 0.2s" in caplog.text


@pytest.mark.parametrize("lifespan", ["on", "auto"])
def test_a_failing_lifespan_startup_raises_lifespan_failed_in_one_line(lifespan: str) -> None:
    async def scenario() -> None:
        app = starlette_app(fail_with="db down")
        server = EmbeddedServer(app, WebOptions(lifespan=lifespan), worker_id=1)
        with pytest.raises(LifespanFailed) as raised:
            await server.startup()
        assert str(raised.value) == "RuntimeError: db down"
        await server.shutdown(WAIT_S)
        server.close()

    run(scenario())


def test_lifespan_failed_carries_the_apps_own_message() -> None:
    async def refuses(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database configured\n"})

    async def scenario() -> None:
        server = EmbeddedServer(refuses, WebOptions(lifespan="auto"), worker_id=1)
        with pytest.raises(LifespanFailed, match=r"^no database configured$"):
            await server.startup()

    run(scenario())


def test_an_app_without_lifespan_is_fine_under_auto_and_fails_under_on() -> None:
    async def scenario() -> None:
        async with Served(http_only, WebOptions(lifespan="auto")) as served, \
                httpx.AsyncClient(base_url=served.url, timeout=WAIT_S) as client:
            assert (await client.get("/")).status_code == 204
        server = EmbeddedServer(http_only, WebOptions(lifespan="on"), worker_id=1)
        with pytest.raises(LifespanFailed) as raised:
            await server.startup()
        assert str(raised.value) == "ValueError: unsupported scope type lifespan"

    run(scenario())


def test_close_and_shutdown_are_safe_without_startup() -> None:
    async def scenario() -> None:
        server = EmbeddedServer(App(), WebOptions(), worker_id=1)
        server.close()
        await server.shutdown(WAIT_S)
        server.close()
        assert server.open_connections == 0

    run(scenario())
