"""A tiny HTTP/1.1 server for dispatcher: answers every request with its pid.

    python -m dispatcher --app examples.hello:handler

Keeps the connection open between requests unless the client asks to close
(``Connection: close``, or HTTP/1.0) or the worker starts draining. HTTP is
parsed by h11, not by hand. ``serve_http`` is the loop, for handlers that
answer differently (the benchmark lab's).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import h11

import worker

_BODY = f"hello from pid {os.getpid()}\n".encode()
_READ_BYTES = 65536

#: Given a request, return the body of the 200 answer.
Answer = Callable[[h11.Request], Awaitable[bytes]]


async def _hello(request: h11.Request) -> bytes:
    return _BODY


def _encode(conn: h11.Connection, *events: h11.Response | h11.Data | h11.EndOfMessage) -> bytes:
    """``events`` as h11 puts them on the wire, joined: written one by one, the head and the body of
    an answer each went out in a system call (and a segment) of their own."""
    return b"".join(conn.send(event) or b"" for event in events)


async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await serve_http(reader, writer, _hello)


async def serve_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: Answer) -> None:
    """Answer each request on the connection with ``answer``'s body, until either side closes."""
    conn = h11.Connection(h11.SERVER)
    me = worker.current()
    served = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                writer.write(_encode(conn, h11.Response(
                    status_code=400, headers=[("connection", "close"), ("content-length", "0")]
                ), h11.EndOfMessage()))
                await writer.drain()
            return
        if event is h11.NEED_DATA:
            if conn.their_state is h11.IDLE and served:
                # Between requests on a kept-alive connection: a draining
                # worker closes it (the client opens another). A new
                # connection's first request is always answered.
                data = await me.read_unless_draining(reader, _READ_BYTES)
                if data is None:
                    return
            else:
                data = await reader.read(_READ_BYTES)
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            body = await answer(event)
            headers = [
                ("content-type", "text/plain"),
                ("content-length", str(len(body))),
                ("x-worker-id", str(me.id)),
            ]
            if me.draining:
                headers.append(("connection", "close"))
            writer.write(_encode(conn, h11.Response(status_code=200, headers=headers),
                                 h11.Data(data=body), h11.EndOfMessage()))
            await writer.drain()
            served += 1
        elif isinstance(event, h11.ConnectionClosed):
            return
        if conn.our_state is h11.MUST_CLOSE:
            return
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
