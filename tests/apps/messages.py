"""A custom server that echoes every message from the master back to it.

``worker.current()`` exists only once the worker runs, so the message handler
is registered when ``serve`` starts, not at import.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import worker


async def serve(me: worker.Worker) -> None:
    """Echo messages as ``{"echo": payload, "worker": id}``; answer connections with ``<id> <pid>``."""

    def echo(payload: Any) -> None:
        me.send({"echo": payload, "worker": me.id})

    me.on_message(echo)
    tasks: set[asyncio.Task[None]] = set()

    async def handle(sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        await reader.readline()
        writer.write(f"{me.id} {me.pid}\n".encode())
        await writer.drain()
        writer.close()

    async for sock, _addr in me.connections():
        task = asyncio.create_task(handle(sock))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
