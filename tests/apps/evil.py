"""A worker app that misbehaves on its channel to the master, on request.

The client sends one line: ``raw HEX`` (send those bytes as one datagram),
``fd HEX`` (the same, with an fd attached), ``fds N HEX`` (with N fds
attached), ``big N`` (an N-byte user message), ``empty`` (a datagram of
no bytes), ``random N`` (N datagrams of random bytes, each up to 64) or
``ok``. The handler answers with its pid first, so the client learns which
worker it reached.
"""

from __future__ import annotations

import array
import asyncio
import os
import random
import socket
import sys


def _channel() -> socket.socket:
    fd = int(sys.argv[sys.argv.index("--channel-fd") + 1])
    return socket.socket(fileno=os.dup(fd))


def _send(datagrams: list[bytes], fds: int = 0) -> None:
    with _channel() as chan:
        attached = array.array("i", [sys.stdin.fileno()] * fds)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, attached)] if fds else []
        for datagram in datagrams:
            chan.sendmsg([datagram], anc)


async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    words = (await reader.readline()).decode().split()
    writer.write(f"{os.getpid()}\n".encode())
    await writer.drain()
    if len(words) == 2 and words[0] == "big":  # a user message of N bytes of JSON
        words = ["raw", (b"\x09" + b"[" * int(words[1])).hex()]
    if len(words) == 2 and words[0] in ("raw", "fd"):
        _send([bytes.fromhex(words[1])], fds=1 if words[0] == "fd" else 0)
    elif len(words) == 3 and words[0] == "fds":
        _send([bytes.fromhex(words[2])], fds=int(words[1]))
    elif words == ["empty"]:
        _send([b""])
    elif len(words) == 2 and words[0] == "random":
        _send([random.randbytes(random.randint(1, 64)) for _ in range(int(words[1]))])
