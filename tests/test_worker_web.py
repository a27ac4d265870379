"""A worker's ASGI interface, in process, over a real channel with real TCP connections.

What the runtime promises every interface, checked for the one that runs
uvicorn's protocols: a hand-off is acked before the app sees a byte of it,
and the load figure in acks and pongs counts the open HTTP connections and
WebSockets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

from bench.peer_probe import answer_lifespan
from shared import protocol
from shared.channel import socketpair
from tests.test_worker_runtime import hand_off, next_message
from worker.app import classify
from worker.runtime import Runtime

calls: list[int] = []
runtime_of_test: list[Runtime] = []


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    # What the runtime had acked when the app first saw this connection.
    calls.append(runtime_of_test[0].acked)
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def serving(loop: asyncio.AbstractEventLoop) -> Iterator[tuple[Runtime, socket.socket]]:
    master_end, worker_end = socketpair()
    runtime = Runtime(0, worker_end, loop, threads=None)
    runtime_of_test[:] = [runtime]
    calls.clear()
    try:
        runtime.start(classify("test:app", app))
        next_message(loop, master_end, protocol.Ready)
        yield runtime, master_end
    finally:
        runtime.drain()  # the lifespan shutdown runs
        loop.run_until_complete(asyncio.wait_for(runtime.wait(), 10))
        runtime.shutdown()
        master_end.close()
        runtime_of_test.clear()


@contextlib.contextmanager
def tcp_connections(count: int) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """``count`` (accepted, client) TCP pairs on 127.0.0.1; the accepted end is the master's copy."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        pairs = []
        try:
            for _ in range(count):
                client = socket.create_connection(listener.getsockname(), timeout=10)
                accepted, _ = listener.accept()
                pairs.append((accepted, client))
            yield pairs
        finally:
            for accepted, client in pairs:
                accepted.close()
                client.close()


def read_response(loop: asyncio.AbstractEventLoop, client: socket.socket, end: bytes) -> bytes:
    client.setblocking(False)

    async def read() -> bytes:
        data = b""
        while end not in data:
            chunk = await loop.sock_recv(client, 4096)
            if not chunk:
                break
            data += chunk
        return data

    return loop.run_until_complete(asyncio.wait_for(read(), 10))


def test_a_handoff_is_acked_before_the_app_sees_its_request(loop: asyncio.AbstractEventLoop) -> None:
    with serving(loop) as (_, master_end), tcp_connections(3) as pairs:
        for _, client in pairs:
            # Already there when the worker gets the connection.
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        masters = [accepted.fileno() for accepted, _ in pairs]
        hand_off(master_end, masters)
        for _, client in pairs:
            assert read_response(loop, client, b"ok").endswith(b"\r\n\r\nok")
        # The three were acked, in one ack, before the app saw any of them.
        assert calls == [3, 3, 3]
        ack = next_message(loop, master_end, protocol.Ack)
        assert ack == protocol.Ack(tuple(masters), True, 3)


def test_the_load_counts_open_http_connections_and_websockets(loop: asyncio.AbstractEventLoop) -> None:
    with serving(loop) as (_, master_end), tcp_connections(3) as pairs:
        keep_alive, websocket = pairs[:2], pairs[2]
        hand_off(master_end, [accepted.fileno() for accepted, _ in pairs])
        for _, client in keep_alive:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            read_response(loop, client, b"ok")  # answered, and kept alive
        key = base64.b64encode(os.urandom(16))
        websocket[1].sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert b" 101 " in read_response(loop, websocket[1], b"\r\n\r\n")
        master_end.send(protocol.encode(protocol.Ping(1)))
        pong = next_message(loop, master_end, protocol.Pong)
        assert isinstance(pong, protocol.Pong)
        assert pong.stats["active"] == 3
        # One keep-alive connection goes away: the figure follows.
        keep_alive[0][1].close()

        async def settled() -> None:
            while runtime_of_test[0].load != 2:
                await asyncio.sleep(0.01)

        loop.run_until_complete(asyncio.wait_for(settled(), 10))
