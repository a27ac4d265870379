"""A Starlette app the web integration tests serve (``tests/test_web_asgi.py``, ``tests/test_web_reload.py``).

Every JSON answer names the worker's pid. What a test must see from inside
the app it answers with: the scope's client, scheme, root path and headers,
the lifespan's state, a request body read chunk by chunk (its size and
sha256), a response body streamed from a generator.

Files the app writes, so that a test can wait for them as events:
``$WEB_TEST_DIR/shutdown-PID`` when the lifespan shutdown of worker PID ran;
``/wait?arrived=PATH`` writes PATH when the request arrives, then waits until
``gate=PATH`` exists (bounded) before it answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

#: A downloaded body is this block repeated (then cut), so a test can hash what it expects.
BLOCK = bytes(range(256)) * 256  # 64 KiB
#: How long ``/wait`` waits for its gate at most.
GATE_TIMEOUT_S = 15.0


def body_of(size: int) -> Iterator[bytes]:
    """The bytes ``/download?n=size`` sends, block by block."""
    while size > 0:
        yield BLOCK[:size]
        size -= len(BLOCK)


def _marker_dir() -> Path | None:
    folder = os.environ.get("WEB_TEST_DIR")
    return Path(folder) if folder else None


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    yield {"started_by": os.getpid(), "token": "set in the lifespan startup"}
    folder = _marker_dir()
    if folder is not None:
        (folder / f"shutdown-{os.getpid()}").write_text("lifespan shutdown ran\n")


async def index(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid(), "factory": getattr(request.app.state, "factory", False)})


async def echo(request: Request) -> JSONResponse:
    client = request.scope.get("client")
    return JSONResponse({
        "pid": os.getpid(),
        "query": list(request.query_params.multi_items()),
        "headers": {k: v for k, v in request.headers.items()},
        "client": list(client) if client else None,
        "scheme": request.scope["scheme"],
        "root_path": request.scope.get("root_path", ""),
        "path": request.scope["path"],
        "http_version": request.scope["http_version"],
        "started_by": request.state.started_by,
        "token": request.state.token,
    })


async def upload(request: Request) -> JSONResponse:
    digest = hashlib.sha256()
    size = chunks = 0
    async for chunk in request.stream():
        if chunk:
            digest.update(chunk)
            size += len(chunk)
            chunks += 1
    return JSONResponse({"pid": os.getpid(), "bytes": size, "sha256": digest.hexdigest(), "chunks": chunks,
                         "transfer_encoding": request.headers.get("transfer-encoding")})


async def download(request: Request) -> StreamingResponse:
    size = int(request.query_params["n"])

    async def blocks() -> AsyncIterator[bytes]:
        for block in body_of(size):
            yield block

    return StreamingResponse(blocks(), media_type="application/octet-stream")


async def wait(request: Request) -> JSONResponse:
    arrived = request.query_params.get("arrived")
    if arrived:
        Path(arrived).write_text(f"{os.getpid()}\n")
    gate = Path(request.query_params["gate"])
    deadline = time.monotonic() + GATE_TIMEOUT_S
    # A file appearing is no event the app can await: look again, bounded.
    while not gate.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return JSONResponse({"pid": os.getpid(), "gated": gate.exists()})


async def ws_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(str(os.getpid()) if text == "pid" else text)
    except WebSocketDisconnect:
        pass


ROUTES = [
    Route("/", index),
    Route("/echo", echo),
    Route("/upload", upload, methods=["POST"]),
    Route("/download", download),
    Route("/wait", wait),
    WebSocketRoute("/ws", ws_echo),
]

app = Starlette(routes=ROUTES, lifespan=lifespan)


def create_app() -> Starlette:
    """The ``--factory`` form: the same app, built by a call, and saying so."""
    built = Starlette(routes=ROUTES, lifespan=lifespan)
    built.state.factory = True
    return built


@asynccontextmanager
async def failing_lifespan(app: Starlette) -> AsyncIterator[None]:
    raise RuntimeError("the database is unreachable on purpose")
    yield


#: A Starlette app whose lifespan startup raises (``--lifespan auto`` must fail the boot).
failing = Starlette(routes=ROUTES, lifespan=failing_lifespan)


async def no_lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A bare ASGI app that raises on the lifespan scope: unsupported under auto, a failure under on."""
    if scope["type"] == "lifespan":
        raise RuntimeError("lifespan is not for this app")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": f"{os.getpid()}".encode()})
