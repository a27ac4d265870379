"""Handlers the integration tests serve. Each answers with ``<worker id> <pid>``."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

import worker


def _me() -> bytes:
    return f"{worker.current().id} {os.getpid()}\n".encode()


async def pid(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read one line, answer with who we are."""
    await reader.readline()
    writer.write(_me())
    await writer.drain()


async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read ``sleep SECONDS``, sleep that long without blocking the loop, then answer."""
    line = (await reader.readline()).decode().split()
    if len(line) == 2 and line[0] == "sleep":
        await asyncio.sleep(float(line[1]))
    writer.write(_me())
    await writer.drain()


def blocking(sock: socket.socket, addr: Any) -> None:
    """The blocking kind: plain socket calls on a pool thread."""
    buf = b""
    while not buf.endswith(b"\n"):
        data = sock.recv(1024)
        if not data:
            return
        buf += data
    sock.sendall(_me())


def blocking_sleep(sock: socket.socket, addr: Any) -> None:
    """The blocking kind, reading ``sleep SECONDS`` and holding its pool thread that long."""
    line = sock.makefile("rb").readline().decode().split()
    if len(line) == 2 and line[0] == "sleep":
        time.sleep(float(line[1]))
    sock.sendall(_me())


async def serve(me: worker.Worker) -> None:
    """The custom-server kind: iterate the worker's connections."""
    tasks = set()

    async def handle(sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        await reader.readline()
        writer.write(f"{me.id} {me.pid} custom\n".encode())
        await writer.drain()
        writer.close()

    async for sock, _addr in me.connections():
        task = asyncio.create_task(handle(sock))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)


not_callable = 42


def wrong_signature(only_one: Any) -> None:
    """Sync with one parameter: no handler kind takes that."""


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer who we are at once, then keep the connection open until the client closes."""
    writer.write(_me())
    await writer.drain()
    await reader.read()


async def block(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """``block SECONDS`` blocks the whole event loop (a bug a health check must catch)."""
    line = (await reader.readline()).decode().split()
    if len(line) == 2 and line[0] == "block":
        time.sleep(float(line[1]))
    writer.write(_me())
    await writer.drain()


_hoard: list[bytes] = []


async def hog(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """``hog MB`` keeps MB megabytes alive in this worker (a leak to recycle)."""
    line = (await reader.readline()).decode().split()
    if len(line) == 2 and line[0] == "hog":
        _hoard.append(b"\x01" * (int(line[1]) * 2**20))  # touched, so resident
    writer.write(_me())
    await writer.drain()


async def inherit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer whether this connection's fd would leak into a child process."""
    await reader.readline()
    sock = writer.get_extra_info("socket")
    writer.write(f"{worker.current().id} {os.getpid()} {os.get_inheritable(sock.fileno())}\n".encode())
    await writer.drain()


def make_asgi() -> Any:
    """A factory (``--factory``): builds an ASGI app that answers with who we are."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": _me()})

    return app


def failing_factory() -> Any:
    raise RuntimeError("no app today")
