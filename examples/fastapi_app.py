"""A FastAPI app with an HTTP route and a WebSocket echo, served on the round-robin hand-off.

    python -m dispatcher --app examples.fastapi_app:app --workers 4

``GET /`` says which worker answered; ``/ws`` echoes each text message back.
The lifespan opens what every worker shares for its lifetime (here just a
counter): it runs in each worker before the worker says it is ready.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    # What a real app opens here: a database pool, an HTTP client.
    yield {"started_by": os.getpid()}


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def hello(request: Request) -> dict[str, Any]:
    return {"hello": "world", "worker_pid": os.getpid(), "lifespan_pid": request.state.started_by}


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass
