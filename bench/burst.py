"""The burst client of workload W4: many connections opened at once, one request each.

Every connection is started in the same event-loop turn, sends one
``GET`` with ``Connection: close`` to 127.0.0.1 and reads the answer to EOF;
``bench.apps:slow`` answers after about a second with the worker that served
it (``worker 3 pid 1234``), so the client can count connections per worker.
Bounded in count (``MAX_CONNECTIONS``) and in time: each connection has a
deadline, and the whole burst another; whatever is still open then is
cancelled and counted as failed.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from dataclasses import dataclass, field

HOST = "127.0.0.1"
#: Upper bound on one burst, whatever the caller asks for.
MAX_CONNECTIONS = 2000
_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3}) ")
_WORKER = re.compile(rb"worker (\d+) pid (\d+)")


@dataclass(frozen=True)
class Outcome:
    """One connection: when it ended, and either who answered or why it failed."""

    latency_s: float
    worker_id: int | None = None
    error: str | None = None


@dataclass
class BurstResult:
    connections: int
    wall_s: float
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is None]

    @property
    def failed(self) -> int:
        return self.connections - len(self.ok)

    @property
    def errors(self) -> collections.Counter[str]:
        return collections.Counter(o.error for o in self.outcomes if o.error is not None)

    def per_worker(self) -> dict[int, int]:
        """Connections answered, per worker id."""
        counts: collections.Counter[int] = collections.Counter(
            o.worker_id for o in self.ok if o.worker_id is not None
        )
        return dict(sorted(counts.items()))


async def _one(port: int, path: str, started: float, timeout_s: float) -> Outcome:
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(request)
            await writer.drain()
            answer = await reader.read(-1)  # to EOF: the server closes after one answer
    except TimeoutError:
        return Outcome(time.monotonic() - started, error="timeout")
    except OSError as exc:
        return Outcome(time.monotonic() - started, error=type(exc).__name__)
    finally:
        if writer is not None:
            writer.close()
    latency = time.monotonic() - started
    status = _STATUS.match(answer)
    if status is None:
        return Outcome(latency, error="no HTTP answer" if answer else "empty answer")
    if status.group(1) != b"200":
        return Outcome(latency, error=f"HTTP {status.group(1).decode()}")
    who = _WORKER.search(answer)
    if who is None:
        return Outcome(latency, error="no worker in the answer")
    return Outcome(latency, worker_id=int(who.group(1)))


async def burst(port: int, connections: int, path: str = "/", timeout_s: float = 15.0) -> BurstResult:
    """Open ``connections`` connections to 127.0.0.1:``port`` at once; one request each.

    Parameters:
        connections: how many, at most ``MAX_CONNECTIONS``.
        path: the request target (e.g. ``/?ms=1000``).
        timeout_s: deadline of each connection, from the start of the burst;
            the burst as a whole ends 5 s later at most.

    Returns:
        Every connection's outcome (cancelled ones as ``timeout``), and the
        wall time from the start to the last answer.

    Raises:
        ValueError: ``connections`` out of range.
    """
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise ValueError(f"connections must be 1 to {MAX_CONNECTIONS}, not {connections}")
    started = time.monotonic()
    tasks = [asyncio.create_task(_one(port, path, started, timeout_s)) for _ in range(connections)]
    done, pending = await asyncio.wait(tasks, timeout=timeout_s + 5.0)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5.0)
    outcomes: list[Outcome] = []
    for task in done:
        exc = task.exception()
        outcomes.append(task.result() if exc is None else Outcome(0.0, error=type(exc).__name__))
    outcomes += [Outcome(time.monotonic() - started, error="timeout") for _ in pending]
    wall = max((o.latency_s for o in outcomes), default=0.0)
    return BurstResult(connections=connections, wall_s=wall, outcomes=outcomes)


def run_burst(port: int, connections: int, path: str = "/", timeout_s: float = 15.0) -> BurstResult:
    """``burst`` on a fresh event loop (blocking)."""
    return asyncio.run(burst(port, connections, path, timeout_s))
