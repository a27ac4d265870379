"""HTTP handlers for the benchmark lab's workloads, served with ``--app bench.apps:NAME``.

- ``cpu``: burns about 2 ms of CPU per request (a busy loop on
  ``time.perf_counter``, holding the worker's event loop as a real
  CPU-bound handler would); ``/?ms=N`` burns N ms instead (0 to 1000).
- ``slow``: waits about 1 s (``asyncio.sleep``, the event loop stays free)
  before answering; ``/?ms=N`` waits N ms instead (0 to 10000).
- ``light``: the lightest handler a custom server would have (W0): reads
  the request head with ``readuntil``, writes a fixed ``200`` and closes.
  No HTTP parser, no worker id: what is left of a connection's cost is the
  hand-off, the event loop and the kernel.
- ``locality``: answers at once, and counts the requests it served on the
  CPU that received them (``SO_INCOMING_CPU`` of the connection, which on
  loopback is the CPU the client thread sent from, against the CPU the
  worker runs on). With ``BENCH_LOCALITY_DIR`` set, each worker writes its
  counts to ``DIR/PID.json`` every ``LOCALITY_FLUSH_S`` while it serves
  (``python -m bench.lab --locality`` reads them).

All but ``light`` answer ``200`` with the worker's id and pid, in the body
(``worker 3 pid 1234``) and in the ``x-worker-id`` header, so a client can
count connections per worker. The HTTP loop is ``examples.hello``'s.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable

import h11

import worker
from examples.hello import Answer, serve_http

#: Default CPU burn of ``cpu`` per request, and its upper bound.
CPU_BURN_MS = 2.0
MAX_CPU_BURN_MS = 1000.0
#: Default wait of ``slow`` per request, and its upper bound.
SLOW_WAIT_MS = 1000.0
MAX_SLOW_WAIT_MS = 10_000.0

#: How often ``locality`` writes its counts while it serves.
LOCALITY_FLUSH_S = 0.2
LOCALITY_DIR_ENV = "BENCH_LOCALITY_DIR"

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


async def _wait(ms: float | None) -> None:
    await asyncio.sleep(_bounded(ms, SLOW_WAIT_MS, MAX_SLOW_WAIT_MS) / 1e3)


def _answering(work: Work) -> Answer:
    """An ``examples.hello.serve_http`` answer: ``work``, then who served the request."""

    async def answer(request: h11.Request) -> bytes:
        await work(_ms_param(request.target))
        return _who()

    return answer


def _who() -> bytes:
    """The answer's body: which worker served it."""
    me = worker.current()
    return f"worker {me.id} pid {me.pid}\n".encode()


_cpu_answer = _answering(_burn)
_slow_answer = _answering(_wait)


async def cpu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Burn about 2 ms of CPU (``?ms=N``: N ms) per request, then answer who served it."""
    await serve_http(reader, writer, _cpu_answer)


async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Wait about 1 s (``?ms=N``: N ms) per request without blocking the loop, then answer."""
    await serve_http(reader, writer, _slow_answer)


_LIGHT_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"


async def light(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read one request head, answer a fixed 200, close (the connection ends with the handler)."""
    try:
        await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return
    writer.write(_LIGHT_ANSWER)


# sched_getcpu(3): the CPU the calling thread runs on (os has no binding for it).
_sched_getcpu = ctypes.CDLL(None, use_errno=True).sched_getcpu
_sched_getcpu.restype = ctypes.c_int
_sched_getcpu.argtypes = []


class _Locality:
    """This worker's counts for ``locality``, written out while it serves."""

    def __init__(self) -> None:
        self.requests = 0
        self.same_cpu = 0
        self._flushing = False

    def count(self, sock: socket.socket) -> None:
        self.requests += 1
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_INCOMING_CPU) == _sched_getcpu():
            self.same_cpu += 1
        if not self._flushing and os.environ.get(LOCALITY_DIR_ENV):
            self._flushing = True
            asyncio.get_running_loop().call_later(LOCALITY_FLUSH_S, self._flush)

    def _flush(self) -> None:
        directory = os.environ[LOCALITY_DIR_ENV]
        me = worker.current()
        path = os.path.join(directory, f"{me.pid}.json")
        counts = {"id": me.id, "pid": me.pid, "requests": self.requests, "same_cpu": self.same_cpu}
        try:
            # Whole files only: the reader may look at any moment.
            with open(path + ".tmp", "w") as out:
                json.dump(counts, out)
            os.replace(path + ".tmp", path)
        except OSError:
            return  # the reader is gone (its directory with it): stop writing
        asyncio.get_running_loop().call_later(LOCALITY_FLUSH_S, self._flush)


_locality = _Locality()


async def locality(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer who served each request at once; count the requests served on the CPU that received them."""
    sock: socket.socket = writer.get_extra_info("socket")

    async def answer(request: h11.Request) -> bytes:
        _locality.count(sock)
        return _who()

    await serve_http(reader, writer, answer)
