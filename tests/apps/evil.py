"""A worker app that misbehaves on its channel to the master, on request.

The client sends one line: ``raw HEX`` (send those bytes as one datagram),
``fd HEX`` (the same, with an fd attached), ``big N`` (an N-byte user
message), ``empty`` (a datagram of no bytes) or ``ok``. The handler answers
with its pid first, so the client learns which worker it reached.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
import sys


def _channel() -> socket.socket:
    fd = int(sys.argv[sys.argv.index("--channel-fd") + 1])
    return socket.socket(fileno=os.dup(fd))


async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    words = (await reader.readline()).decode().split()
    writer.write(f"{os.getpid()}\n".encode())
    await writer.drain()
    if len(words) == 2 and words[0] == "big":  # a user message of N bytes of JSON
        words = ["raw", (b"\x09" + b"[" * int(words[1])).hex()]
    if words == ["empty"]:
        words = ["raw", ""]
    if len(words) == 2 and words[0] in ("raw", "fd"):
        with _channel() as chan:
            fds = [sys.stdin.fileno()] if words[0] == "fd" else []
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            chan.sendmsg([bytes.fromhex(words[1])], anc)
