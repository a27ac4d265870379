"""The burst client of workload W4: many connections opened at once, one request each.

Every connection is started in the same event-loop turn, sends one
``GET`` with ``Connection: close`` to 127.0.0.1 and reads the answer to EOF;
``bench.apps:slow`` answers after about a second with the worker that served
it (``worker 3 pid 1234``), so the client can count connections per worker.
Another way of naming the worker can be given (``identify``: the
comparison's apps name it in a header, ``bench.worker_counts.header_worker``).
Bounded in count (``MAX_CONNECTIONS``) and in time: each connection has a
deadline, and the whole burst another; whatever is still open then is
cancelled and counted as failed.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.load import Request, http_error, http_get
from bench.server import HOST

#: Upper bound on one burst, whatever the caller asks for.
MAX_CONNECTIONS = 2000
_WORKER = re.compile(r"worker (\d+) pid (\d+)")


def worker_id(answer: str) -> int | None:
    """The worker id a ``bench.apps`` answer names (``worker 3 pid 1234``), or None."""
    who = _WORKER.search(answer)
    return int(who.group(1)) if who else None


@dataclass
class BurstResult:
    connections: int
    #: When the burst began (``time.monotonic``): each request's latency is counted from it.
    started_at: float
    requests: list[Request] = field(default_factory=list)
    #: Which worker an answer names.
    identify: Callable[[str], int | None] = worker_id

    @property
    def ok(self) -> list[Request]:
        return [r for r in self.requests if r.ok]

    @property
    def failed(self) -> int:
        return self.connections - len(self.ok)

    @property
    def wall_s(self) -> float:
        """From the start to the last answer."""
        return max((r.done_at - self.started_at for r in self.requests), default=0.0)

    def latencies_ms(self) -> list[float]:
        """Of the requests that succeeded."""
        return [(r.done_at - self.started_at) * 1e3 for r in self.ok]

    @property
    def errors(self) -> collections.Counter[str]:
        return collections.Counter(r.error for r in self.requests if not r.ok)

    def per_worker(self) -> dict[int, int]:
        """Connections answered, per worker id."""
        counts = collections.Counter(self.identify(r.answer) for r in self.ok)
        return dict(sorted((k, v) for k, v in counts.items() if k is not None))


async def _one(port: int, path: str, timeout_s: float, identify: Callable[[str], int | None]) -> Request:
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(http_get(port, path))
            await writer.drain()
            answer = (await reader.read(-1)).decode(errors="replace")  # to EOF: one answer, then close
    except TimeoutError:
        return Request(time.monotonic(), error="timeout")
    except OSError as exc:
        return Request(time.monotonic(), error=type(exc).__name__)
    finally:
        if writer is not None:
            writer.close()
    error = http_error(answer) or ("" if identify(answer) is not None else "no worker in the answer")
    return Request(time.monotonic(), answer, error)


async def burst(port: int, connections: int, path: str = "/", timeout_s: float = 15.0,
                identify: Callable[[str], int | None] = worker_id) -> BurstResult:
    """Open ``connections`` connections to 127.0.0.1:``port`` at once; one request each.

    Parameters:
        connections: how many, at most ``MAX_CONNECTIONS``.
        path: the request target (e.g. ``/?ms=1000``).
        timeout_s: deadline of each connection, from the start of the burst;
            the burst as a whole ends 5 s later at most.
        identify: which worker an answer names (default: the body's ``worker N``).

    Returns:
        Every connection's request (cancelled ones failed as ``timeout``).

    Raises:
        ValueError: ``connections`` out of range.
    """
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise ValueError(f"connections must be 1 to {MAX_CONNECTIONS}, not {connections}")
    result = BurstResult(connections, time.monotonic(), identify=identify)
    tasks = [asyncio.create_task(_one(port, path, timeout_s, identify)) for _ in range(connections)]
    done, pending = await asyncio.wait(tasks, timeout=timeout_s + 5.0)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5.0)
    for task in done:
        exc = task.exception()
        result.requests.append(
            task.result() if exc is None else Request(result.started_at, error=type(exc).__name__)
        )
    result.requests += [Request(time.monotonic(), error="timeout") for _ in pending]
    return result


def run_burst(port: int, connections: int, path: str = "/", timeout_s: float = 15.0,
              identify: Callable[[str], int | None] = worker_id) -> BurstResult:
    """``burst`` on a fresh event loop (blocking)."""
    return asyncio.run(burst(port, connections, path, timeout_s, identify))
