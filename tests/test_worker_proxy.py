"""``--proxy-protocol`` in the worker, in process: real TCP connections handed off over a real channel.

The client sends a v1 or v2 header and then its request; the handler sees the header's client and
the request, not the header. An untrusted peer's header is data; a trusted peer without one is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shared.proxy_protocol import V2_SIGNATURE
from shared.web_options import WebOptions
from tests.apps import proxied
from tests.test_worker_runtime import hand_off, next_ack
from worker.app import classify
from worker.runtime import Runtime

V1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 4711 443\r\n"
V2 = (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 12 + 7) + ipaddress.IPv4Address("198.51.100.9").packed
      + ipaddress.IPv4Address("192.0.2.1").packed + struct.pack("!HH", 5150, 443) + b"\x04\x00\x04abcd")


@contextlib.contextmanager
def running(loop: asyncio.AbstractEventLoop, handler: Callable[..., Any],
            allow: str = "127.0.0.1") -> Iterator[tuple[Runtime, socket.socket]]:
    from shared.channel import socketpair

    master_end, worker_end = socketpair()
    runtime = Runtime(0, worker_end, loop, threads=2, web=WebOptions(forwarded_allow_ips=allow),
                      proxy_protocol=True)
    try:
        runtime.start(classify("test:handler", handler))
        loop.run_until_complete(asyncio.wait_for(_ready(runtime), 10))
        yield runtime, master_end
        runtime.drain()
        loop.run_until_complete(asyncio.wait_for(runtime.wait(), 10))
    finally:
        runtime.shutdown()
        master_end.close()


async def _ready(runtime: Runtime) -> None:
    while not runtime.ready:
        await asyncio.sleep(0.005)


@contextlib.contextmanager
def tcp_connection(sends: list[bytes]) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(server side, client) of a real 127.0.0.1 TCP connection; the client sent ``sends`` in turn."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
    try:
        for data in sends:
            client.sendall(data)
        yield server_side, client
    finally:
        server_side.close()
        client.close()


def answer(loop: asyncio.AbstractEventLoop, client: socket.socket) -> bytes:
    client.setblocking(False)

    async def read() -> bytes:
        data = b""
        while not data.endswith(b"\n") and (chunk := await loop.sock_recv(client, 200)):
            data += chunk
        return data

    return loop.run_until_complete(asyncio.wait_for(read(), 10))


HANDLERS = {"streams": proxied.streams, "blocking": proxied.blocking, "server": proxied.server}


@pytest.mark.parametrize("kind", HANDLERS)
@pytest.mark.parametrize(("header", "client"), [(V1, b"203.0.113.7 4711"), (V2, b"198.51.100.9 5150")],
                         ids=["v1", "v2"])
def test_the_handler_sees_the_headers_client_and_only_the_request(
    loop: asyncio.AbstractEventLoop, kind: str, header: bytes, client: bytes
) -> None:
    with running(loop, HANDLERS[kind]) as (_, master_end), tcp_connection([header + b"hello\n"]) as (conn, c):
        hand_off(master_end, [conn.fileno()])
        assert answer(loop, c) == client + b" hello\n"
        assert next_ack(loop, master_end).accepted  # type: ignore[attr-defined]


def test_a_header_that_comes_in_pieces_is_waited_for(loop: asyncio.AbstractEventLoop) -> None:
    with running(loop, proxied.blocking) as (_, master_end), tcp_connection([V2[:7]]) as (conn, c):
        hand_off(master_end, [conn.fileno()])
        loop.run_until_complete(asyncio.sleep(0.05))
        c.sendall(V2[7:20])
        loop.run_until_complete(asyncio.sleep(0.05))
        c.sendall(V2[20:] + b"hi\n")
        assert answer(loop, c) == b"198.51.100.9 5150 hi\n"


def test_an_untrusted_peers_header_is_data(loop: asyncio.AbstractEventLoop) -> None:
    with running(loop, proxied.streams, allow="10.9.9.9") as (_, master_end), \
            tcp_connection([V1 + b"hello\n"]) as (conn, c):
        hand_off(master_end, [conn.fileno()])
        # The handler reads one line: the header's, as data; the peer is the socket's own.
        assert answer(loop, c) == f"127.0.0.1 {c.getsockname()[1]} ".encode() + V1


def test_a_trusted_peer_without_a_header_is_closed_and_logged_once(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "worker.proxy_header")
    with running(loop, proxied.blocking) as (_, master_end), \
            tcp_connection([b"GET / HTTP/1.1\r\n\r\n"]) as (one, c1), \
            tcp_connection([b"hello\n"]) as (two, c2):
        hand_off(master_end, [one.fileno(), two.fileno()])
        assert answer(loop, c1) == b"" and answer(loop, c2) == b""
        # Closed, and acked (ours now: the master must let go of its copy).
        acked = {next_ack(loop, master_end).conn_ids[0] for _ in range(2)}  # type: ignore[attr-defined]
        assert acked == {one.fileno(), two.fileno()}
    lines = [r.getMessage() for r in caplog.records if "PROXY protocol" in r.getMessage()]
    assert len(lines) == 1 and "127.0.0.1" in lines[0], lines
