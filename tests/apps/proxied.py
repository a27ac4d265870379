"""Apps that answer with the client address they were given (``--proxy-protocol`` tests).

Each reads one line (or one HTTP request) and answers with the client's host and port as
``HOST PORT`` and what it read after, so a test sees both the address and that the header
bytes were not left in the stream.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Iterable
from typing import Any


def _answer(client: Any, line: bytes) -> bytes:
    host, port = (client[0], client[1]) if isinstance(client, tuple) else (client, 0)
    return f"{host} {port} ".encode() + line


async def streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    line = await reader.readline()
    writer.write(_answer(writer.get_extra_info("peername"), line))
    await writer.drain()


def blocking(sock: socket.socket, addr: Any) -> None:
    data = b""
    while not data.endswith(b"\n") and (chunk := sock.recv(100)):
        data += chunk
    sock.sendall(_answer(addr, data))


async def server(worker: Any) -> None:
    loop = asyncio.get_running_loop()
    async for sock, addr in worker.connections():
        with sock:
            data = b""
            while not data.endswith(b"\n") and (chunk := await loop.sock_recv(sock, 100)):
                data += chunk
            await loop.sock_sendall(sock, _answer(addr, data))


async def asgi(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    if scope["type"] != "http":
        return
    body = json.dumps({"client": scope["client"]}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = json.dumps({"client": [environ["REMOTE_ADDR"], int(environ.get("REMOTE_PORT", 0))]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
