"""HTTP handlers for the benchmark lab's workloads, served with ``--app bench.apps:NAME``.

- ``cpu``: burns about 2 ms of CPU per request (a busy loop on
  ``time.perf_counter``, holding the worker's event loop as a real
  CPU-bound handler would); ``/?ms=N`` burns N ms instead (0 to 1000).
- ``hello``: no work at all; the same answer as the others (for the
  rolling-reload run, beside ``examples.hello``).
- ``slow``: waits about 1 s (``asyncio.sleep``, the event loop stays free)
  before answering; ``/?ms=N`` waits N ms instead (0 to 10000).

All answer ``200`` with the worker's id and pid, in the body
(``worker 3 pid 1234``) and in the ``x-worker-id`` header, so a client can
count connections per worker. HTTP is parsed by h11, keep-alive as in
``examples.hello``; a worker that starts draining closes connections idle
between requests, but answers the first request of a new one (its client
has sent it, or is about to).
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import Awaitable, Callable

import h11

import worker

#: Default CPU burn of ``cpu`` per request, and its upper bound.
CPU_BURN_MS = 2.0
MAX_CPU_BURN_MS = 1000.0
#: Default wait of ``slow`` per request, and its upper bound.
SLOW_WAIT_MS = 1000.0
MAX_SLOW_WAIT_MS = 10_000.0

_READ_BYTES = 65536

#: Given the request target's ``ms`` parameter (or None), do the request's work.
Work = Callable[[float | None], Awaitable[None]]


def _ms_param(target: bytes) -> float | None:
    """The ``ms`` query parameter of ``target`` as a float, or None if absent or not a number."""
    query = urllib.parse.urlsplit(target.decode("latin-1")).query
    values = urllib.parse.parse_qs(query).get("ms")
    if not values:
        return None
    try:
        return float(values[0])
    except ValueError:
        return None


def _bounded(value: float | None, default: float, upper: float) -> float:
    if value is None or value != value:  # absent or NaN
        return default
    return min(max(value, 0.0), upper)


async def _burn(ms: float | None) -> None:
    end = time.perf_counter() + _bounded(ms, CPU_BURN_MS, MAX_CPU_BURN_MS) / 1e3
    while time.perf_counter() < end:
        pass


async def _nothing(ms: float | None) -> None:
    return None


async def _wait(ms: float | None) -> None:
    await asyncio.sleep(_bounded(ms, SLOW_WAIT_MS, MAX_SLOW_WAIT_MS) / 1e3)


async def _serve_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, work: Work) -> None:
    """Answer each request on the connection after ``work``; keep-alive unless asked to close."""
    conn = h11.Connection(h11.SERVER)
    me = worker.current()
    body = f"worker {me.id} pid {me.pid}\n".encode()
    served = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                writer.write(conn.send(h11.Response(
                    status_code=400, headers=[("connection", "close"), ("content-length", "0")]
                )))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
            return
        if event is h11.NEED_DATA:
            if conn.their_state is h11.IDLE and served:
                # Idle between requests: a draining worker closes the connection. Not before the
                # first request, though: a client that just connected has sent one, or is about to.
                data = await me.read_unless_draining(reader, _READ_BYTES)
                if data is None:
                    return
            else:
                data = await reader.read(_READ_BYTES)
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            await work(_ms_param(event.target))
            headers = [
                ("content-type", "text/plain"),
                ("content-length", str(len(body))),
                ("x-worker-id", str(me.id)),
            ]
            if me.draining:
                headers.append(("connection", "close"))
            writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
            writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            served += 1
        elif isinstance(event, h11.ConnectionClosed):
            return
        if conn.our_state is h11.MUST_CLOSE:
            return
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()


async def cpu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Burn about 2 ms of CPU (``?ms=N``: N ms) per request, then answer who served it."""
    await _serve_http(reader, writer, _burn)


async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Wait about 1 s (``?ms=N``: N ms) per request without blocking the loop, then answer."""
    await _serve_http(reader, writer, _wait)


async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer who served the request, at once."""
    await _serve_http(reader, writer, _nothing)
