"""A raw ASGI app for the scaling-out test: says which instance and worker answered, and whom it saw.

``INSTANCE`` (environment) names the dispatcher instance; the body is JSON:
``{"instance": ..., "pid": ..., "client": [host, port]}``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from bench.peer_probe import answer_lifespan

INSTANCE = os.environ.get("INSTANCE", "?")


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    body = json.dumps({"instance": INSTANCE, "pid": os.getpid(), "client": scope.get("client")}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
