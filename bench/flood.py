"""The flood client: many concurrent clients, a new connection per request, in a process of its own.

    python -m bench.flood --port 8000 --clients 400 --seconds 20 [--requests N] [--line 'hi'] \
        [--expect '\\d+ \\d+\\n'] [--timeout 10]

Each client is a coroutine on one event loop (uvloop when installed) that
connects to 127.0.0.1, sends ``line``, reads the answer to EOF and starts
again, so ``--clients`` is how many connections are open or connecting at
any moment. A request succeeds when the answer is not empty and, with
``--expect``, matches it in full; otherwise it failed, counted by kind
(``bench.load.failure_kind``: ``timeout``, ``reset``, ``refused``,
``empty``, ``partial``, or the errno's name). Bounded in time
(``--seconds``) and in count (``--requests``); each request has its own
``--timeout``. When it ends it prints one JSON object (``FloodResult``).

``Flood`` runs it as a child process, so that the flood competes with the
server for the CPU and not with the caller for its GIL; the child is ended
by its PID if it overruns its bound.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import TracebackType

from bench.load import REQUEST_TIMEOUT_S, failure_kind
from bench.server import HOST, ROOT

#: Bound on the number of requests of one flood, whatever the caller asks for.
MAX_REQUESTS = 1_000_000
#: Bound on concurrent clients.
MAX_CLIENTS = 5000
#: Beyond its duration and one request's timeout, how long ``Flood.wait`` gives the child.
SLACK_S = 15.0


@dataclass(frozen=True)
class FloodResult:
    """What a flood did: requests sent, succeeded, and the failures by kind."""

    sent: int
    ok: int
    failures: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def failed(self) -> int:
        return self.sent - self.ok

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def describe_failures(self) -> str:
        """``reset 3, empty 1``; ``none`` if nothing failed."""
        return ", ".join(f"{kind} {n}" for kind, n in sorted(self.failures.items())) or "none"


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, OSError) and type(exc) is OSError and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno {exc.errno}")
    return type(exc).__name__


async def _one(port: int, line: bytes, expect: re.Pattern[str] | None, timeout_s: float) -> str:
    """One request; return why it failed (``bench.load`` error names), empty if it did not."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(line)
            await writer.drain()
            answer = (await reader.read(-1)).decode(errors="replace")
    except TimeoutError:
        return "TimeoutError"
    except OSError as exc:
        return _error_name(exc)
    finally:
        if writer is not None:
            writer.close()
    if not answer:
        return "empty answer"
    if expect is not None and not expect.fullmatch(answer):
        return "partial answer"
    return ""


async def flood(port: int, clients: int, seconds: float, requests: int = MAX_REQUESTS,
                line: bytes = b"hi\n", expect: str | None = None,
                timeout_s: float = REQUEST_TIMEOUT_S) -> FloodResult:
    """Run the flood on the running loop; see the module's docstring."""
    pattern = re.compile(expect) if expect is not None else None
    started = time.monotonic()
    deadline = started + seconds
    begun = 0
    ok = 0
    failures: collections.Counter[str] = collections.Counter()

    async def client() -> None:
        nonlocal begun, ok
        while begun < requests and time.monotonic() < deadline:
            begun += 1
            error = await _one(port, line, pattern, timeout_s)
            if error:
                failures[failure_kind(error)] += 1
            else:
                ok += 1

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    # Every request ends within its timeout: the bound holds without cancelling.
    await asyncio.wait(tasks, timeout=seconds + timeout_s + 5.0)
    for task in tasks:
        task.cancel()
    return FloodResult(ok + sum(failures.values()), ok, dict(failures), round(time.monotonic() - started, 3))


def _run(args: argparse.Namespace) -> FloodResult:
    coro = flood(args.port, args.clients, args.seconds, args.requests, args.line.encode() + b"\n",
                 args.expect, args.timeout)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help=f"the server's port on {HOST}")
    parser.add_argument("--clients", type=int, default=100, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="stop starting requests after this")
    parser.add_argument("--requests", type=int, default=MAX_REQUESTS, help="stop after this many in all")
    parser.add_argument("--line", default="hi", help="what each request sends (a newline is added)")
    parser.add_argument("--expect", default=None, help="a regular expression the whole answer must match")
    parser.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT_S, help="of each request, s")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be 1 to {MAX_CLIENTS}")
    if not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests must be 1 to {MAX_REQUESTS}")
    if not 0 < args.seconds <= 3600:
        parser.error("--seconds must be above 0 and at most 3600")
    result = _run(args)
    print(json.dumps({"sent": result.sent, "ok": result.ok, "failures": result.failures,
                      "elapsed_s": result.elapsed_s}))
    return 0


class Flood:
    """``python -m bench.flood`` as a child process: start it, wait for its result, or end it.

    Parameters as the command line's; ``line`` without its newline.
    """

    def __init__(self, port: int, clients: int, *, seconds: float, requests: int = MAX_REQUESTS,
                 line: str = "hi", expect: str | None = None, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.bound_s = seconds + timeout_s + SLACK_S
        self.command = [
            sys.executable, "-m", "bench.flood", "--port", str(port), "--clients", str(clients),
            "--seconds", str(seconds), "--requests", str(requests), "--line", line,
            "--timeout", str(timeout_s),
        ]
        if expect is not None:
            self.command += ["--expect", expect]
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Flood:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()

    def start(self) -> Flood:
        self.proc = subprocess.Popen(self.command, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "start() first"
        return self.proc.pid

    def wait(self) -> FloodResult:
        """The flood's result, once it ended (bounded: past its bound it is killed).

        Raises:
            RuntimeError: it failed, or was killed for overrunning.
        """
        assert self.proc is not None, "start() first"
        try:
            out, err = self.proc.communicate(timeout=self.bound_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"the flood {self.pid} overran {self.bound_s:g} s and was killed") from None
        if self.proc.returncode != 0:
            raise RuntimeError(f"the flood exited with code {self.proc.returncode}: {err.strip()}")
        data = json.loads(out)
        return FloodResult(int(data["sent"]), int(data["ok"]),
                           {str(k): int(v) for k, v in data["failures"].items()}, float(data["elapsed_s"]))

    def kill(self) -> None:
        """End the child by its PID if it still runs; idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.communicate(timeout=5.0)


if __name__ == "__main__":
    sys.exit(main())
