"""A raw ASGI app for the scaling-out test: says which instance and worker answered, and whom it saw.

``INSTANCE`` (environment) names the dispatcher instance; the body is JSON:
``{"instance": ..., "pid": ..., "client": [host, port]}``.
"""

from __future__ import annotations

import json
import os
from typing import Any

INSTANCE = os.environ.get("INSTANCE", "?")


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = json.dumps({"instance": INSTANCE, "pid": os.getpid(), "client": scope.get("client")}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
