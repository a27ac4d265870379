"""HTTP handlers for the benchmark lab's workloads, served with ``--app bench.apps:NAME``.

- ``cpu``: burns about 2 ms of CPU per request (a busy loop on
  ``time.perf_counter``, holding the worker's event loop as a real
  CPU-bound handler would); ``/?ms=N`` burns N ms instead (0 to 1000).
- ``slow``: waits about 1 s (``asyncio.sleep``, the event loop stays free)
  before answering; ``/?ms=N`` waits N ms instead (0 to 10000).

All answer ``200`` with the worker's id and pid, in the body
(``worker 3 pid 1234``) and in the ``x-worker-id`` header, so a client can
count connections per worker. The HTTP loop is ``examples.hello``'s.
"""

from __future__ import annotations

import asyncio
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
        me = worker.current()
        return f"worker {me.id} pid {me.pid}\n".encode()

    return answer


_cpu_answer = _answering(_burn)
_slow_answer = _answering(_wait)


async def cpu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Burn about 2 ms of CPU (``?ms=N``: N ms) per request, then answer who served it."""
    await serve_http(reader, writer, _cpu_answer)


async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Wait about 1 s (``?ms=N``: N ms) per request without blocking the loop, then answer."""
    await serve_http(reader, writer, _slow_answer)
