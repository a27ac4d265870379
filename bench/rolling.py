"""The lab's rolling-reload run: ``reload`` through the control socket while clients keep coming.

A few client threads each open a connection to 127.0.0.1, send one ``GET``
with ``Connection: close``, read the answer to EOF and start again; a request
fails when anything raises, it times out, or the answer is not ``200``. Every
outcome is timestamped (``time.monotonic``), so the requests served and
failed *during* the reload are counted exactly: between sending ``reload``
and its answer (the master answers once every worker has been replaced).
The load is bounded in time and in count, whatever happens to the server.
"""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from bench.harness import CtlError, LabServer

HOST = "127.0.0.1"
#: Socket timeout of one request.
REQUEST_TIMEOUT_S = 10.0
#: How long ``stop`` waits for each client thread (a request under way ends on its timeout).
JOIN_TIMEOUT_S = REQUEST_TIMEOUT_S + 5.0


@dataclass(frozen=True)
class Outcome:
    done_at: float
    ok: bool
    error: str = ""


class Load:
    """``clients`` threads, each a new connection per request, until stopped or bounded.

    Parameters:
        port: the server's port on 127.0.0.1.
        clients: concurrent client threads.
        max_seconds: the load stops by itself this long after ``start``.
        max_requests: ... or after this many requests in all.
        path: the request target.
    """

    def __init__(self, port: int, clients: int = 4, max_seconds: float = 120.0,
                 max_requests: int = 1_000_000, path: str = "/") -> None:
        self.port = port
        self.request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode()
        self.max_seconds = max_seconds
        self.max_requests = max_requests
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
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

    def stop(self) -> None:
        """Stop and join the client threads (each within ``JOIN_TIMEOUT_S``)."""
        self._stop.set()
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(JOIN_TIMEOUT_S)

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with self._lock:
                if len(self.outcomes) >= self.max_requests:
                    return
            outcome = self._one()
            with self._lock:
                self.outcomes.append(outcome)

    def _one(self) -> Outcome:
        try:
            with socket.create_connection((HOST, self.port), timeout=REQUEST_TIMEOUT_S) as sock:
                sock.sendall(self.request)
                chunks = []
                while data := sock.recv(65536):
                    chunks.append(data)
        except OSError as exc:
            return Outcome(time.monotonic(), False, type(exc).__name__)
        answer = b"".join(chunks)
        if not answer.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 ")):
            return Outcome(time.monotonic(), False, "not 200" if answer else "empty answer")
        return Outcome(time.monotonic(), True)

    def between(self, start: float, end: float) -> tuple[int, int, collections.Counter[str]]:
        """(served, failed, failures by kind) among requests that ended in ``[start, end]``."""
        with self._lock:
            mine = [o for o in self.outcomes if start <= o.done_at <= end]
        failed = [o for o in mine if not o.ok]
        return len(mine) - len(failed), len(failed), collections.Counter(o.error for o in failed)


@dataclass
class ReloadRun:
    """What one rolling reload under load showed."""

    app: str
    policy: str
    workers: int
    clients: int
    #: Seconds from sending ``reload`` to its answer.
    reload_s: float
    #: The master's answer, or the error if it failed.
    answer: str
    served_during: int
    failed_during: int
    served_total: int
    failed_total: int
    #: Requests per second in the second(s) before the reload, and during it.
    rate_before: float
    rate_during: float
    failures: dict[str, int] = field(default_factory=dict)
    pids_before: list[int] = field(default_factory=list)
    pids_after: list[int] = field(default_factory=list)
    server_log: str = ""
    exit_code: int | None = None

    @property
    def replaced(self) -> int:
        """Workers whose pid changed (every one, in a complete reload)."""
        return len(set(self.pids_before) - set(self.pids_after))


#: Seconds of load before the reload (the "before" rate) and after its answer.
LOAD_BEFORE_S = 1.5
LOAD_AFTER_S = 1.0
#: Bound on the reload itself.
RELOAD_TIMEOUT_S = 120.0


def run_reload(policy: str, workers: int, clients: int, control_dir: Path,
               app: str = "examples.hello:handler", path: str = "/") -> ReloadRun:
    """Start a dispatcher, load it, reload it through the control socket, stop it.

    The load runs ``LOAD_BEFORE_S`` before the reload and ``LOAD_AFTER_S``
    after its answer. A reload the master reports as failed (or that times
    out) is recorded in ``answer``, not raised.

    Raises:
        RuntimeError, TimeoutError: the server did not start.
        CtlError: the status request before the reload failed.
    """
    lab = LabServer(app, policy, workers, control_dir)
    with lab:
        pids_before = [int(w["pid"]) for w in lab.status()["workers"] if w["pid"]]
        load = Load(lab.port, clients, max_seconds=RELOAD_TIMEOUT_S + 30.0, path=path)
        with load:
            started = time.monotonic()
            time.sleep(LOAD_BEFORE_S)
            reload_at = time.monotonic()
            try:
                answer = json.dumps(lab.reload(RELOAD_TIMEOUT_S))
            except CtlError as exc:
                answer = f"failed: {exc}"
            reloaded_at = time.monotonic()
            time.sleep(LOAD_AFTER_S)
        ended = time.monotonic()
        pids_after = [int(w["pid"]) for w in lab.status()["workers"] if w["pid"]]
    served_before, _, _ = load.between(started, reload_at)
    served, failed, _ = load.between(reload_at, reloaded_at)
    served_total, failed_total, failures_total = load.between(started, ended + JOIN_TIMEOUT_S)
    reload_s = reloaded_at - reload_at
    return ReloadRun(
        app=app, policy=policy, workers=workers, clients=clients, reload_s=reload_s, answer=answer,
        served_during=served, failed_during=failed, served_total=served_total, failed_total=failed_total,
        rate_before=served_before / (reload_at - started),
        rate_during=served / reload_s if reload_s > 0 else float("nan"),
        failures=dict(failures_total), pids_before=pids_before, pids_after=pids_after,
        server_log=lab.log, exit_code=lab.exit_code,
    )
