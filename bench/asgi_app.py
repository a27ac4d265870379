"""The comparison's ASGI app: a raw ASGI 3 callable, no framework, so the servers are what is measured.

    python -m uvicorn bench.asgi_app:app --workers 2 ...
    python -m dispatcher --app bench.asgi_app:app --interface asgi ...

Paths (anything else is ``/``):

- ``/``: ``hello``;
- ``/cpu``: burns 2 ms of CPU first (the event loop is held, as a CPU-bound
  handler would hold it);
- ``/sleep``: waits 1 s first (``asyncio.sleep``: the loop stays free);
- ``/nodelay``: whether this connection's socket has ``TCP_NODELAY`` on
  (``bench.peer_probe.tcp_nodelay``).

Every answer is a ``200`` with ``content-length`` (so no server adds chunked
framing) and ``x-worker: <pid>``. The lifespan protocol is answered, so no
server logs that it is unsupported or waits for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from bench.peer_probe import PID, SLEEP_S, WORKER_HEADER, answer_lifespan, burn_cpu, mark_ready, tcp_nodelay

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_HEADERS = [(b"content-type", b"text/plain"), (WORKER_HEADER.encode(), str(PID).encode())]

mark_ready()


def _nodelay(scope: Scope) -> bytes:
    client, server = scope.get("client"), scope.get("server")
    peer = (str(client[0]), int(client[1])) if client else None
    return tcp_nodelay(peer, int(server[1]) if server else None).encode()


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    path = scope["path"]
    body = b"hello"
    if path == "/cpu":
        burn_cpu()
    elif path == "/sleep":
        await asyncio.sleep(SLEEP_S)
    elif path == "/nodelay":
        body = _nodelay(scope)
    await send({
        "type": "http.response.start",
        "status": 200,
        "headers": [*_HEADERS, (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})
