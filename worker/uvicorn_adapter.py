"""uvicorn's HTTP/1.1 and WebSocket protocols, serving sockets this worker was handed, in its own loop.

Everything the worker knows of uvicorn is here. uvicorn's ``Server`` is not used: it binds its own
listeners, installs signal handlers and runs a main loop of its own. This module builds and loads a
``Config``, runs the app's lifespan, and hands each socket to uvicorn's HTTP protocol class itself.

Theory of operation:

- Sockets. The caller hands a connected socket to ``serve()`` and does not touch it again;
  ``loop.connect_accepted_socket`` makes a transport that owns it and closes it when the connection
  ends. If the hand-over fails (a TLS handshake error, say), ``serve()`` closes it. Nothing else here
  opens or closes a socket.
- Connections. uvicorn's protocols put themselves in ``ServerState.connections`` while open (an HTTP
  connection upgraded to a WebSocket swaps itself for the WebSocket protocol) and their app tasks in
  ``ServerState.tasks``. Sockets still in ``serve()`` (TLS handshakes) are counted here on top.
- Draining. An ASGI middleware around the app adds ``connection: close`` to every response started
  once ``drain()`` was called, and uvicorn's protocols close after such a response. The protocols' own
  ``shutdown()`` closes idle keep-alive connections, marks in-flight requests to close after their
  response and closes WebSockets with 1012. A connection with no request yet is not shut down at once
  (uvicorn would close it): it gets the grace to send its first request, then is shut down.
- Client address (``--proxy-protocol``). ``serve(sock, client=...)``: the protocol is given a transport
  whose ``peername`` (and ``socket``'s ``getpeername()``) is that client, so ``scope["client"]``, the
  access log and a WebSocket it upgrades to (uvicorn hands it the same transport) all name it.
- Default headers. ``date`` and ``server`` are what ``ServerState.default_headers`` holds, refreshed
  once a second as uvicorn's ``Server.on_tick`` does.

uvicorn internals touched (tests/test_uvicorn_adapter.py checks each: its contract tests the shapes,
its drain, WebSocket and access-log tests the behaviours; re-check them all on an upgrade, and widen
``UVICORN_VERSIONS`` only then):

- ``uvicorn.server.ServerState``: ``connections``, ``tasks``, ``default_headers``;
- ``Config`` after ``load()``: ``loaded_app`` (and that ``load()`` calls it with no arguments to detect a
  factory), ``http_protocol_class``, ``ws_protocol_class``, ``lifespan_class``, ``ssl``,
  ``encoded_headers``, ``date_header``;
- the HTTP protocol classes (h11, httptools): built with ``config=, server_state=, app_state=, _loop=``;
  ``connection_made(transport)`` takes the client from the transport's ``socket`` extra
  (``getpeername()``), else its ``peername``, and a WebSocket upgrade passes the WebSocket protocol
  the same transport; the only transport methods they call are ``write``, ``close``, ``is_closing``,
  ``pause_reading``, ``resume_reading``, ``set_protocol`` and ``get_extra_info``;
  ``cycle`` is None until the first request; ``shutdown()``; ``transport``; a response with
  ``connection: close`` closes the connection after it; httptools' (``HttpToolsProtocol``) adds that
  header itself to a response started after its ``shutdown()``, so requests begun before the drain
  skip the middleware there;
- the WebSocket protocol classes: ``shutdown()`` (close code 1012), ``transport``;
- the lifespan classes (``uvicorn.lifespan.on.LifespanOn``, ``off.LifespanOff``): built with the config;
  ``startup()``, ``shutdown()``, ``should_exit``, ``state``;
- ``uvicorn.importer.ImportFromStringError``: what ``load()`` raises for a protocol it cannot import;
- the ``uvicorn.access`` logger: the protocols write access lines only if it ``hasHandlers()``, and
  ``Config(access_log=False)`` silences it for the whole process.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from email.utils import formatdate
from typing import Any, Literal, Protocol, cast

import uvicorn
from uvicorn.config import Config
from uvicorn.importer import ImportFromStringError
from uvicorn.server import ServerState

from shared.web_options import WebOptions

log = logging.getLogger(__name__)

#: The uvicorn releases this module is tested against (the ``web`` extra pins the same range).
UVICORN_VERSIONS = ">=0.54,<0.55"

#: An ASGI 3 application. Its arguments' types are left open so that apps typed with any ASGI typing
#: (starlette's, a2wsgi's, asgiref's) fit.
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]

# The package each --http/--ws choice imports: named in the error when missing, where uvicorn would
# fail with an import error from deep inside its protocol modules.
_PACKAGES = {"httptools": "httptools", "websockets": "websockets", "websockets-sansio": "websockets",
             "wsproto": "wsproto"}
# uvicorn offers no event for "the last connection is gone": wait_closed() looks this often.
_POLL_S = 0.02
# After wait_closed() aborts what is left, how long the cancelled tasks get to unwind.
_ABORT_WAIT_S = 1.0


class LifespanFailed(Exception):
    """The app's lifespan startup failed; ``str(exc)`` is one line naming the error."""


class _Connection(Protocol):
    """What this module uses of uvicorn's HTTP and WebSocket protocol objects."""

    transport: asyncio.Transport | None

    def shutdown(self) -> None: ...


class _HTTPConnection(_Connection, Protocol):
    """An HTTP protocol object: its ``cycle`` (the request/response under way) is None until a request."""

    cycle: object


class _Lifespan(Protocol):
    """What this module uses of uvicorn's lifespan objects."""

    state: dict[str, Any]
    should_exit: bool

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def version_in_range(version: str, spec: str = UVICORN_VERSIONS) -> bool:
    """Whether ``version`` meets every ``>=X`` and ``<Y`` clause of ``spec`` (release numbers only).

    A tiny comparison, so that the worker needs no ``packaging`` at run time.
    """
    for clause in (part.strip() for part in spec.split(",")):
        if clause.startswith(">="):
            ok = _release(version) >= _release(clause[2:])
        elif clause.startswith("<"):
            ok = _release(version) < _release(clause[1:])
        else:
            raise ValueError(f"unsupported version clause {clause!r} in {spec!r}")
        if not ok:
            return False
    return True


def check_version() -> str | None:
    """One line of warning if the installed uvicorn is outside ``UVICORN_VERSIONS``, else None."""
    if version_in_range(uvicorn.__version__):
        return None
    return (f"uvicorn {uvicorn.__version__} is installed, but ASGI/WSGI serving is tested with uvicorn"
            f"{UVICORN_VERSIONS} only (it uses uvicorn internals); install a version in that range")


def _with_connection_close(message: _Message) -> _Message:
    headers = [(name, value) for name, value in message.get("headers", ()) if name.lower() != b"connection"]
    return {**message, "headers": [*headers, (b"connection", b"close")]}


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # The last line: for a traceback (starlette sends one as its failure message), the error itself.
    return lines[-1] if lines else ""


class _Outermost:
    """The app as uvicorn sees it: says ``connection: close`` while draining, notes lifespan failures.

    Also makes ``Config.load()``'s factory probe (a call with no arguments) harmless whatever the app
    is: calling this with no arguments is a TypeError before any code runs.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.draining = False
        #: The HTTP protocol says ``connection: close`` itself once its ``shutdown()`` ran (httptools
        #: does; h11 only closes after the response): then a request begun before the drain needs no
        #: wrapping, and the hot path is the app's own call.
        self.protocol_says_close = False
        self.startup_message: str | None = None
        self.lifespan_error: Exception | None = None

    async def __call__(self, scope: _Message, receive: _Receive, send: _Send) -> None:
        if scope["type"] == "http":
            if self.protocol_says_close and not self.draining:
                return await self.app(scope, receive, send)

            async def send_http(message: _Message) -> None:
                # Checked per response, not per request: drain() may come while the app works.
                if self.draining and message["type"] == "http.response.start":
                    message = _with_connection_close(message)
                await send(message)

            await self.app(scope, receive, send_http)
        elif scope["type"] == "lifespan":
            async def send_lifespan(message: _Message) -> None:
                if message["type"] == "lifespan.startup.failed":
                    self.startup_message = str(message.get("message") or "")
                await send(message)

            try:
                await self.app(scope, receive, send_lifespan)
            except Exception as exc:
                self.lifespan_error = exc
                raise
        else:
            await self.app(scope, receive, send)

    def failure(self) -> str:
        """One line for LifespanFailed: the app's own message, else its exception."""
        line = _one_line(self.startup_message or "")
        if line:
            return line
        if self.lifespan_error is not None:
            detail = _one_line(str(self.lifespan_error))
            name = type(self.lifespan_error).__name__
            return f"{name}: {detail}" if detail else name
        return "the app's lifespan startup failed"


def _demote_errors(record: logging.LogRecord) -> bool:
    """A logging filter: errors become debug records (dropped unless the worker logs at debug level)."""
    if record.levelno >= logging.ERROR:
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return True


def _says_close_itself(protocol_class: type[asyncio.Protocol]) -> bool:
    """Whether the HTTP protocol adds ``connection: close`` to a response once its ``shutdown()`` ran."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is not installed: the protocol is h11's
        return False
    return issubclass(protocol_class, HttpToolsProtocol)


def _require(option: str, value: str) -> None:
    package = _PACKAGES.get(value)
    if package is None:
        return
    try:
        importlib.import_module(package)
    except ImportError:
        raise ValueError(f"{option} {value} needs the {package!r} package, which is not installed") from None


def _peer(sock: socket.socket) -> object:
    try:
        return sock.getpeername()
    except OSError:
        return "?"


class _ClientSocket:
    """The transport's socket as uvicorn's protocols see it: ``getpeername()`` is the client."""

    def __init__(self, sock: Any, client: Any) -> None:
        self._sock = sock
        self._client = client

    def getpeername(self) -> Any:
        return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _ClientTransport:
    """A transport as uvicorn's protocols see it: ``client`` is its peer; the rest is the transport's."""

    def __init__(self, transport: asyncio.Transport, client: Any) -> None:
        self._transport = transport
        self._client = client
        self.write = transport.write
        self.is_closing = transport.is_closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._client
        if name == "socket":
            sock = self._transport.get_extra_info("socket")
            return default if sock is None else _ClientSocket(sock, self._client)
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class EmbeddedServer:
    """uvicorn's HTTP/1.1 and WebSocket protocols serving sockets accepted elsewhere, in the running loop."""

    def __init__(self, app: ASGIApp, options: WebOptions, *, worker_id: int, wsgi: bool = False) -> None:
        """Build and load uvicorn's Config for ``app``; ValueError (one line) if ``options`` cannot be met.

        ``wsgi``: ``app`` is a WSGI app wrapped by a2wsgi; no WebSockets and no lifespan then.
        """
        options.check()
        ws = "none" if wsgi else options.ws
        lifespan = cast(Literal["auto", "on", "off"], "off" if wsgi else options.lifespan)
        _require("--http", options.http)
        _require("--ws", ws)
        self._worker_id = worker_id
        self._app = _Outermost(app)
        # log_config=None: the worker's logging stays as it is (uvicorn would dictConfig its own).
        self._config = Config(
            self._app, log_config=None, log_level=None, access_log=options.access_log,
            interface="asgi3", factory=False, http=options.http, ws=ws, lifespan=lifespan,
            proxy_headers=options.proxy_headers, forwarded_allow_ips=options.forwarded_allow_ips,
            root_path=options.root_path, timeout_keep_alive=options.timeout_keep_alive,
            limit_concurrency=options.limit_concurrency,
            ssl_keyfile=options.ssl_keyfile, ssl_certfile=options.ssl_certfile,
        )
        if options.access_log:
            # Config(access_log=False) turns propagation off for the whole process and nothing turns it
            # back on; access lines reach the worker's root handler (and its "[worker N]") by propagating.
            logging.getLogger("uvicorn.access").propagate = True
        try:
            self._config.load()
        except OSError as exc:  # ssl.SSLError included: the TLS files are all load() reads
            raise ValueError(f"--ssl-certfile/--ssl-keyfile cannot be used: {exc}") from None
        except (ImportError, ImportFromStringError) as exc:
            raise ValueError(f"--http {options.http} / --ws {ws} cannot be loaded: {exc}") from None
        self._app.protocol_says_close = _says_close_itself(self._config.http_protocol_class)
        self._state = ServerState()
        self._lifespan: _Lifespan = self._config.lifespan_class(self._config)
        self._started = False
        self._connecting: set[asyncio.Task[None]] = set()
        self._refresh: asyncio.TimerHandle | None = None
        self._grace_s = 0.0
        self._graces: dict[_Connection, asyncio.TimerHandle] = {}

    async def startup(self) -> None:
        """Run the lifespan startup, then refresh ``date`` and ``server`` once a second.

        Raises:
            LifespanFailed: the app failed its startup (or, with lifespan "on", does not support it).
        """
        # uvicorn logs a failed startup as errors with the app's traceback; the master's one line
        # says it (LifespanFailed), and the traceback stays at debug level.
        uvicorn_log = logging.getLogger("uvicorn.error")
        uvicorn_log.addFilter(_demote_errors)
        try:
            await self._lifespan.startup()
        finally:
            uvicorn_log.removeFilter(_demote_errors)
        if self._lifespan.should_exit:
            raise LifespanFailed(self._app.failure())
        self._started = True
        self._refresh_headers()

    def _refresh_headers(self) -> None:
        now = time.time()
        date = [(b"date", formatdate(now, usegmt=True).encode())] if self._config.date_header else []
        self._state.default_headers = date + self._config.encoded_headers
        # Due at the turn of the next wall-clock second, so `date` is never more than a moment stale.
        self._refresh = asyncio.get_running_loop().call_later(1.0 - now % 1.0, self._refresh_headers)

    def _make_protocol(self, client: Any = None) -> asyncio.Protocol:
        protocol_class: Callable[..., asyncio.Protocol] = self._config.http_protocol_class
        protocol = protocol_class(config=self._config, server_state=self._state,
                                  app_state=self._lifespan.state, _loop=asyncio.get_running_loop())
        if client is not None:
            made = protocol.connection_made

            def connection_made(transport: asyncio.BaseTransport) -> None:
                made(cast(asyncio.Transport, _ClientTransport(cast(asyncio.Transport, transport), client)))

            protocol.connection_made = connection_made  # type: ignore[method-assign]
        return protocol

    def serve(self, sock: socket.socket, client: Any = None) -> None:
        """Start serving one accepted, connected socket, which is the transport's from now on (it closes it).

        The transport is made in a task of this module's (after the TLS handshake, if any), so that
        wait_closed() can abort a handshake that hangs; a failure is logged, not raised. Nothing is
        read from the socket before that task's first step. ``client``: the address the app is to
        see instead of the socket's peer (a PROXY protocol header's), ``getpeername()``-shaped.
        """
        task = asyncio.get_running_loop().create_task(self._connect(sock, client))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        # Cancelled before it ran: nothing took the socket.
        task.add_done_callback(lambda done: sock.close() if done.cancelled() else None)

    async def _connect(self, sock: socket.socket, client: Any) -> None:
        peer = _peer(sock) if client is None else client
        try:
            _, protocol = await asyncio.get_running_loop().connect_accepted_socket(
                lambda: self._make_protocol(client), sock=sock, ssl=self._config.ssl)
        except (Exception, asyncio.CancelledError) as exc:
            # The transport, if made, has closed the socket (asyncio closes this very object, uvloop
            # detaches it): closing it again is a no-op then, and closes it if no transport took it.
            sock.close()
            log.debug("connection from %s failed before serving: %r", peer, exc)
            return
        if self._app.draining:
            # Connected (a TLS handshake finished, say) after drain() began.
            self._drain_one(cast(_Connection, protocol))

    @property
    def open_connections(self) -> int:
        """HTTP connections and WebSockets open now, counting those still being connected by serve()."""
        return len(self._state.connections) + len(self._connecting)

    def drain(self, first_request_grace_s: float) -> None:
        """Begin a graceful stop (idempotent): responses from now on say ``connection: close``; idle
        keep-alive connections close now; a connection with no request yet has
        ``first_request_grace_s`` to send one; in-flight requests finish; WebSockets close with 1012.
        A connection made later (serve() called after, or a TLS handshake ending after) is drained the
        same way when made, with a grace of its own.
        """
        if self._app.draining:
            return
        self._app.draining = True
        self._grace_s = first_request_grace_s
        for connection in list(self._connections):
            self._drain_one(connection)

    def _drain_one(self, connection: _Connection) -> None:
        http = isinstance(connection, self._config.http_protocol_class)
        if http and cast(_HTTPConnection, connection).cycle is None:
            # No request yet: uvicorn's shutdown() would close it, but the master may have handed it
            # over a moment ago with the request on its way. It gets the grace; the answer says close.
            loop = asyncio.get_running_loop()
            self._graces[connection] = loop.call_later(self._grace_s, self._end_grace, connection)
        else:
            self._shutdown(connection)

    def _end_grace(self, connection: _Connection) -> None:
        del self._graces[connection]
        if connection in self._connections:
            # Still no request: closed. A request under way: it finishes, then the connection closes.
            self._shutdown(connection)

    def _shutdown(self, connection: _Connection) -> None:
        try:
            connection.shutdown()
        except Exception:
            # A state its shutdown() did not expect must not stop the drain: the connection goes anyway.
            log.debug("shutdown of %r failed", connection, exc_info=True)
            if connection.transport is not None:
                connection.transport.close()

    @property
    def _connections(self) -> set[_Connection]:
        return cast(set[_Connection], self._state.connections)

    def _busy(self) -> bool:
        return bool(self._state.connections or self._state.tasks or self._connecting)

    async def wait_closed(self, timeout_s: float) -> None:
        """Return once every connection is closed and every task is done; after ``timeout_s``, abort
        what is left (one log line says how much) and return."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._busy() and loop.time() < deadline:
            await asyncio.sleep(_POLL_S)
        if not self._busy():
            return
        connections = list(self._connections)
        tasks = [*self._state.tasks, *self._connecting]
        log.warning("%d connection(s) and %d task(s) left after %gs: aborting them",
                    len(connections), len(tasks), timeout_s)
        for connection in connections:
            if connection.transport is not None:
                connection.transport.abort()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_ABORT_WAIT_S)
        # connection_lost() comes in a callback after abort().
        await asyncio.sleep(0)

    async def shutdown(self, timeout_s: float) -> None:
        """Run the lifespan shutdown, bounded by ``timeout_s`` (logged, never raised); stop the refresh."""
        self.close()
        if not self._started:
            return
        self._started = False
        try:
            await asyncio.wait_for(self._lifespan.shutdown(), timeout_s)
        except TimeoutError:
            log.warning("the app's lifespan shutdown took longer than %gs; left unfinished", timeout_s)
        except Exception:
            log.exception("the app's lifespan shutdown failed")

    def close(self) -> None:
        """Stop the header refresh and the first-request graces; idempotent, safe before startup()."""
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None
        for handle in self._graces.values():
            handle.cancel()
        self._graces.clear()
