"""A bounded load client for 127.0.0.1: new connection per request, counting failures."""

from __future__ import annotations

import collections
import socket
import threading
import time
from types import TracebackType


class Load:
    """``clients`` threads each connect, send ``line``, read the answer to EOF, repeat.

    Stops by itself after ``max_seconds`` or ``max_requests`` in all, whichever
    comes first, or at ``stop()``. A request fails if anything raises or the
    answer is empty.
    """

    def __init__(self, port: int, clients: int = 4, line: bytes = b"hi\n",
                 max_seconds: float = 30.0, max_requests: int = 200_000) -> None:
        self.port = port
        self.line = line
        self.deadline = time.monotonic() + max_seconds
        self.max_requests = max_requests
        self.ok = 0
        self.failed = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.answers: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object | type[BaseException] | TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def wait_requests(self, count: int, timeout: float = 10.0) -> None:
        """Block until ``count`` more requests succeeded (or fail with TimeoutError)."""
        target = self.ok + count
        deadline = time.monotonic() + timeout
        while self.ok < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"load stalled at {self.ok} ok, {self.failed} failed: {self.errors}")
            time.sleep(0.01)

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            if self.ok + self.failed >= self.max_requests:
                return
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    sock.sendall(self.line)
                    chunks = []
                    while data := sock.recv(4096):
                        chunks.append(data)
                answer = b"".join(chunks).decode()
                if not answer:
                    raise ConnectionError("empty answer")
            except OSError as exc:
                with self._lock:
                    self.failed += 1
                    self.errors[f"{type(exc).__name__}: {exc}"] += 1
                continue
            with self._lock:
                self.ok += 1
                self.answers[answer.split()[1] if len(answer.split()) > 1 else answer] += 1
