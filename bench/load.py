"""The load client: threads that each make a new connection per request to 127.0.0.1, every outcome kept.

A request is a raw ``line`` (the tests' line-protocol apps; it succeeds on
any answer, or with ``expect`` on one that matches it in full) or, with
``path``, an HTTP ``GET`` with ``Connection: close`` (it succeeds on a
``200``). Each client thread connects, sends, reads the
answer to EOF and starts again; a request fails when anything raises, its
socket times out, or the answer is not one that succeeds. Every outcome is
kept with the moment it ended (``time.monotonic``), so a caller can count
what happened between two moments (``between``: the rolling reload) or
wait for more successes (``wait_requests``: the tests).

Bounded in time (``max_seconds`` from ``start``) and in count
(``max_requests`` in all): the load stops by itself, whatever the server
does. ``ask`` is one such request, made once. ``failure_kind`` sorts the
reasons a request failed into the kinds the fault suite counts (``kinds``).
"""

from __future__ import annotations

import collections
import re
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType

from bench.server import HOST

#: Socket timeout of one request.
REQUEST_TIMEOUT_S = 10.0
#: How long ``stop`` waits for each client thread (a request under way ends on its timeout).
JOIN_TIMEOUT_S = REQUEST_TIMEOUT_S + 5.0
_STATUS = re.compile(r"HTTP/1\.[01] (\d{3}) ")
#: The kind of each reason a request fails for; any other reason is its own kind.
_KINDS = {
    "TimeoutError": "timeout",
    "ConnectionResetError": "reset",
    "BrokenPipeError": "reset",
    "ConnectionRefusedError": "refused",
    "empty answer": "empty",
    "partial answer": "partial",
}


def failure_kind(error: str) -> str:
    """Why a request failed (``Request.error``), as a kind: timeout, reset, refused, empty, partial."""
    return _KINDS.get(error, error)


def read_all(sock: socket.socket) -> str:
    """Everything the peer sends until it closes, decoded."""
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def ask(port: int, line: bytes = b"hi\n", timeout: float = REQUEST_TIMEOUT_S, host: str = HOST) -> str:
    """Connect, send ``line``, return everything the server says until it closes."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(line)
        return read_all(sock)


def http_get(port: int, path: str = "/") -> bytes:
    """One ``GET path`` to 127.0.0.1:``port`` with ``Connection: close``."""
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode()


def http_error(answer: str) -> str:
    """Why ``answer`` is not an HTTP ``200``; empty if it is one."""
    status = _STATUS.match(answer)
    if status is None:
        return "no HTTP answer" if answer else "empty answer"
    return "" if status.group(1) == "200" else f"HTTP {status.group(1)}"


@dataclass(frozen=True)
class Request:
    """One request: when it ended, the answer, and why it failed (empty if it did not)."""

    done_at: float
    answer: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


class Load:
    """``clients`` threads, each a new connection per request, until stopped or bounded.

    Parameters:
        port: the server's port on 127.0.0.1.
        clients: concurrent client threads.
        line: what a request sends, unless ``path`` is given.
        path: send ``GET path`` with ``Connection: close`` instead; a 200 succeeds.
        expect: with ``line``, an answer must match this in full (else: ``partial answer``).
        max_seconds: the load stops by itself this long after ``start``.
        max_requests: ... or after this many requests in all.
        timeout: of each request's socket.
    """

    def __init__(self, port: int, clients: int = 4, *, line: bytes = b"hi\n", path: str | None = None,
                 expect: re.Pattern[str] | None = None, max_seconds: float = 60.0,
                 max_requests: int = 200_000, timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.port = port
        self.http = path is not None
        self.payload = http_get(port, path) if path is not None else line
        self.expect = expect
        self.timeout = timeout
        self.max_seconds = max_seconds
        self.max_requests = max_requests
        #: Every request so far, in the order they ended.
        self.requests: list[Request] = []
        self._begun = 0
        self._succeeded = 0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._deadline = 0.0
        self._threads = [
            threading.Thread(target=self._run, name=f"load-{n}", daemon=True) for n in range(clients)
        ]

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        self._deadline = time.monotonic() + self.max_seconds
        for thread in self._threads:
            thread.start()

    def stop(self, join: bool = True) -> None:
        """Stop and join the client threads (each within ``JOIN_TIMEOUT_S``).

        With ``join`` False, only tell them to stop: each ends once its request
        under way does (a client whose SYN went unanswered waits for the
        kernel to send it again); ``join()`` waits for that later.
        """
        self._stop.set()
        if join:
            self.join()

    def join(self, timeout: float = JOIN_TIMEOUT_S) -> bool:
        """Wait (each thread up to ``timeout``) for the load to end; return whether it has.

        Without ``stop()``, it ends at its bound: ``max_requests`` or ``max_seconds``.
        """
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(timeout)
        return not any(thread.is_alive() for thread in self._threads)

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with self._changed:
                if self._begun >= self.max_requests:
                    return
                self._begun += 1
            request = self._one()
            with self._changed:
                self.requests.append(request)
                self._succeeded += request.ok
                self._changed.notify_all()

    def _one(self) -> Request:
        try:
            answer = ask(self.port, self.payload, timeout=self.timeout)
        except OSError as exc:
            return Request(time.monotonic(), error=type(exc).__name__)
        if self.http:
            return Request(time.monotonic(), answer, http_error(answer))
        if not answer:
            return Request(time.monotonic(), answer, "empty answer")
        if self.expect is not None and not self.expect.fullmatch(answer):
            return Request(time.monotonic(), answer, "partial answer")
        return Request(time.monotonic(), answer)

    @property
    def ok(self) -> int:
        return self._succeeded

    @property
    def failed(self) -> int:
        with self._changed:
            return len(self.requests) - self._succeeded

    @property
    def errors(self) -> collections.Counter[str]:
        """Failed requests by why."""
        with self._changed:
            return collections.Counter(r.error for r in self.requests if not r.ok)

    @property
    def kinds(self) -> collections.Counter[str]:
        """Failed requests by kind (``failure_kind``)."""
        with self._changed:
            return collections.Counter(failure_kind(r.error) for r in self.requests if not r.ok)

    @property
    def answers(self) -> collections.Counter[str]:
        """Successful requests by the answer's second word (the tests' apps answer ``ID PID``)."""
        with self._changed:
            words = [r.answer.split() for r in self.requests if r.ok]
        return collections.Counter(w[1] if len(w) > 1 else " ".join(w) for w in words)

    def wait_requests(self, count: int, timeout: float = 10.0) -> None:
        """Block until ``count`` more requests succeeded.

        Raises:
            TimeoutError: they did not within ``timeout`` seconds.
        """
        with self._changed:
            target = self._succeeded + count
            if not self._changed.wait_for(lambda: self._succeeded >= target, timeout):
                raise TimeoutError(f"load stalled at {self._succeeded} ok; failed: {self.errors}")

    def between(self, start: float, end: float) -> tuple[int, int, collections.Counter[str]]:
        """(served, failed, failures by why) among the requests that ended in ``[start, end]``."""
        with self._changed:
            mine = [r for r in self.requests if start <= r.done_at <= end]
        failed = [r for r in mine if not r.ok]
        return len(mine) - len(failed), len(failed), collections.Counter(r.error for r in failed)
