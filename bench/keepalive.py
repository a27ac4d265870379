"""A keep-alive load client that retries once on a closed idle connection, as browsers do.

Each client thread keeps one HTTP/1.1 connection (``http.client``) to
127.0.0.1 and sends ``GET`` after ``GET`` on it. A server that replaces its
workers closes the idle keep-alive connections of the old ones; a browser
that finds its reused connection closed before any byte of the answer came
(``RemoteDisconnected``, a reset or a broken pipe on a reused connection)
sends the request again once on a new connection, and so does this client.
What fails after that retry, or on a fresh connection, fails.

Every outcome is kept with the moment it ended (``time.monotonic``), so
``between`` counts what happened during a reload; bounded in time
(``max_seconds``) like ``bench.load.Load``.
"""

from __future__ import annotations

import collections
import http.client
import threading
import time
from dataclasses import dataclass
from types import TracebackType

from bench.load import REQUEST_TIMEOUT_S, failure_kind
from bench.server import HOST

JOIN_TIMEOUT_S = REQUEST_TIMEOUT_S + 5.0
#: What a reused connection the server closed while idle raises: the request may be sent again.
CLOSED_IDLE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


@dataclass(frozen=True)
class Outcome:
    """One request, after the retry if it needed one."""

    done_at: float
    #: Why it failed (empty: it did not).
    error: str = ""
    #: Its first try met a reused connection closed by the server (then it was sent again).
    retried: bool = False
    #: That first try was a connection reset (ECONNRESET), not a clean close.
    reset: bool = False

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class Tally:
    """What ``KeepAliveLoad.between`` counts."""

    served: int
    failed: int
    #: Failed requests by kind (``bench.load.failure_kind``).
    failures: dict[str, int]
    #: Requests sent again after a closed idle connection (served or not).
    retried: int
    #: Of those, the ones whose first try was reset rather than closed.
    resets: int


class KeepAliveLoad:
    """``clients`` threads, each one keep-alive connection, until stopped or ``max_seconds`` passed."""

    def __init__(self, port: int, clients: int = 2, path: str = "/", max_seconds: float = 60.0,
                 timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.port = port
        self.path = path
        self.timeout = timeout
        self.max_seconds = max_seconds
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = 0.0
        self._threads = [threading.Thread(target=self._run, name=f"keepalive-{n}", daemon=True)
                         for n in range(clients)]

    def __enter__(self) -> KeepAliveLoad:
        self._deadline = time.monotonic() + self.max_seconds
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(JOIN_TIMEOUT_S)

    def _get(self, conn: http.client.HTTPConnection) -> str:
        """One request on ``conn``: empty if it got a 200, else why not."""
        conn.request("GET", self.path)
        response = conn.getresponse()
        response.read()
        return "" if response.status == 200 else f"HTTP {response.status}"

    def _run(self) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
        try:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                self._record(self._one(conn))
        finally:
            conn.close()

    def _one(self, conn: http.client.HTTPConnection) -> Outcome:
        reused = conn.sock is not None
        try:
            error = self._get(conn)
            return Outcome(time.monotonic(), error)
        except CLOSED_IDLE as exc:
            conn.close()
            if not reused:
                return Outcome(time.monotonic(), type(exc).__name__)
            reset = isinstance(exc, ConnectionResetError)
        except OSError as exc:
            conn.close()
            return Outcome(time.monotonic(), type(exc).__name__)
        except http.client.HTTPException as exc:
            conn.close()
            return Outcome(time.monotonic(), type(exc).__name__)
        try:  # the retry, on a new connection
            return Outcome(time.monotonic(), self._get(conn), retried=True, reset=reset)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            return Outcome(time.monotonic(), type(exc).__name__, retried=True, reset=reset)

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def between(self, start: float, end: float) -> Tally:
        """What the requests that ended in ``[start, end]`` came to."""
        with self._lock:
            mine = [o for o in self.outcomes if start <= o.done_at <= end]
        failed = [o for o in mine if not o.ok]
        return Tally(
            served=len(mine) - len(failed), failed=len(failed),
            failures=dict(collections.Counter(failure_kind(o.error) for o in failed)),
            retried=sum(o.retried for o in mine), resets=sum(o.reset for o in mine),
        )
