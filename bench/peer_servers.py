"""The servers of the comparison: their command lines, and one running server of any of them.

Each ``Kind`` is a server and an interface: this project under each policy
(``--interface asgi``, and round-robin ``--interface wsgi``), ``uvicorn
--workers``, gunicorn with ``uvicorn_worker.UvicornWorker`` or ``gthread``,
and granian (ASGI or WSGI). All serve ``bench.asgi_app:app`` or
``bench.wsgi_app:app`` on 127.0.0.1 with the same worker count, uvloop
where the server runs a Python event loop, and access logs off.

``Running`` starts one and knows it the same way whatever it is: its worker
pids from the files the app creates when a worker loads it
(``bench.peer_probe.mark_ready``) among the server's descendants, its
readiness from those (every worker has loaded the app) and a ``200`` on
``/``. This project's servers are ``bench.server.Server`` underneath (port
0, ``ready`` and ``reload`` over the control socket); the others get a free
port picked here, since not every one reports a port 0 it was given. With
``cpu`` set, the server is started under ``taskset -c CPU``, so every
process and thread it ever has inherits that affinity.

Every process is stopped by PID: SIGTERM to the server's first process,
then SIGKILL to it and to every descendant seen, after ``STOP_TIMEOUT_S``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.layouts import taskset
from bench.load import ask, http_error, http_get
from bench.peer_probe import READY_DIR_ENV
from bench.proc import rss_of
from bench.report import python
from bench.server import HOST, ROOT, Server, StartedOnEnter, StartError, end_process

#: Bound on a start: every worker has loaded the app and ``/`` answered.
START_TIMEOUT_S = 40.0
#: After the last worker loaded the app, it still has to start serving: a moment for it.
SETTLE_S = 0.3
STOP_TIMEOUT_S = 15.0
#: A reload replaces every worker; granian waits ``--respawn-interval`` (3.5 s) between two.
RELOAD_TIMEOUT_S = 90.0
POLL_S = 0.05

ASGI_APP = "bench.asgi_app:app"
WSGI_APP = "bench.wsgi_app:app"


@dataclass(frozen=True)
class Kind:
    """One server of the comparison.

    Parameters:
        key: its name on the command line and in the JSON.
        label: its name in tables.
        family: ``dispatcher``, ``uvicorn``, ``gunicorn`` or ``granian``.
        interface: ``asgi`` or ``wsgi``.
        policy: this project's policy (``dispatcher`` only).
        reload: how it is reloaded (for the report); empty: it cannot be.
        loop: the Python event loop (uvicorn's ``--loop``: the TCP_NODELAY check tries asyncio).
    """

    key: str
    label: str
    family: str
    interface: str
    policy: str = ""
    reload: str = ""
    loop: str = "uvloop"

    @property
    def app(self) -> str:
        return ASGI_APP if self.interface == "asgi" else WSGI_APP

    @property
    def dispatcher(self) -> bool:
        return self.family == "dispatcher"

    def arguments(self, workers: int, threads: int, port: int | str = "PORT") -> list[str]:
        """The server's arguments after the interpreter (``-m ...``), for ``workers``.

        ``threads``: WSGI threads per worker. A dispatcher's ``--bind`` and
        ``--control`` are ``bench.server.Server``'s to add.
        """
        if self.family == "dispatcher":
            line = ["-m", "dispatcher", "--app", self.app, "--interface", self.interface,
                    "--policy", self.policy, "--no-access-log", "--loop", "uvloop", "--http", "httptools"]
            return line + (["--threads", str(threads)] if self.interface == "wsgi" else [])
        if self.family == "uvicorn":
            return ["-m", "uvicorn", self.app, "--host", HOST, "--port", str(port), "--workers", str(workers),
                    "--loop", self.loop, "--http", "httptools", "--no-access-log", "--log-level", "warning"]
        if self.family == "gunicorn":
            worker = (["-k", "uvicorn_worker.UvicornWorker"] if self.interface == "asgi"
                      else ["-k", "gthread", "--threads", str(threads)])
            # No --access-logfile: gunicorn's access log is off, and UvicornWorker's with it.
            return ["-m", "gunicorn", *worker, "-w", str(workers), "-b", f"{HOST}:{port}",
                    "--log-level", "warning", self.app]
        if self.family == "granian":
            # --runtime-threads 1 (its default): one Rust I/O thread per worker, as the others have one
            # event loop per worker; more would only compete for the 2 cores. The app's loop is uvloop.
            threading = (["--blocking-threads", str(threads)] if self.interface == "wsgi"
                         else ["--loop", "uvloop"])
            return ["-m", "granian", "--interface", self.interface, "--host", HOST, "--port", str(port),
                    "--workers", str(workers), "--runtime-threads", "1", *threading, "--no-access-log",
                    "--log-level", "warning", self.app]
        raise ValueError(f"unknown server family {self.family!r}")


KINDS: dict[str, Kind] = {k.key: k for k in (
    Kind("round-robin", "dispatcher round-robin", "dispatcher", "asgi", "round-robin", "ctl reload"),
    Kind("shared", "dispatcher shared", "dispatcher", "asgi", "shared", "ctl reload"),
    Kind("reuseport", "dispatcher reuseport", "dispatcher", "asgi", "reuseport", "ctl reload"),
    Kind("uvicorn", "uvicorn --workers", "uvicorn", "asgi", reload="SIGHUP"),
    Kind("gunicorn", "gunicorn + UvicornWorker", "gunicorn", "asgi", reload="SIGHUP"),
    Kind("granian", "granian (ASGI)", "granian", "asgi", reload="SIGHUP"),
    Kind("wsgi-round-robin", "dispatcher round-robin (WSGI)", "dispatcher", "wsgi", "round-robin",
         "ctl reload"),
    Kind("wsgi-gunicorn", "gunicorn gthread", "gunicorn", "wsgi", reload="SIGHUP"),
    Kind("wsgi-granian", "granian (WSGI)", "granian", "wsgi", reload="SIGHUP"),
)}
ASGI_KEYS = tuple(k for k, kind in KINDS.items() if kind.interface == "asgi")
WSGI_KEYS = tuple(k for k, kind in KINDS.items() if kind.interface == "wsgi")
#: Only for the TCP_NODELAY check: uvicorn's multiprocess path on asyncio's loop (uvicorn issue #3149).
NODELAY_EXTRA = Kind("uvicorn-asyncio", "uvicorn --workers --loop asyncio", "uvicorn", "asgi", loop="asyncio")


#: What each family's options are, and why, for the report.
NOTES = {
    "dispatcher": "`--interface asgi|wsgi --loop uvloop --http httptools --no-access-log`: uvicorn's "
                  "httptools protocol in each worker, as uvicorn runs it; WSGI through a thread pool of "
                  "`--threads 4`.",
    "uvicorn": "`--workers N --loop uvloop --http httptools --no-access-log`: the supervisor binds one "
               "socket and every worker accepts on it.",
    "gunicorn": "`-k uvicorn_worker.UvicornWorker` (its loop and http are `auto`: uvloop and httptools, "
                "both installed) or `-k gthread --threads 4`; no `--access-logfile`, so no access log; one "
                "shared socket.",
    "granian": "`--runtime-threads 1` (its default: one Rust I/O thread per worker, as the others have one "
               "event loop per worker; more would only compete for the 2 cores, and granian itself warns "
               "that Rust threads are almost never the limit), runtime mode `auto` (the multi-threaded "
               "runtime for ASGI and WSGI), `--loop uvloop` for the ASGI app's Python loop, "
               "`--blocking-threads 4` for WSGI (as gunicorn's `--threads 4`; its default would be "
               "backpressure/2, 256 threads), `--no-access-log` (its default); the main process binds one "
               "socket the workers share. On SIGHUP it starts each worker's replacement, waits "
               "`--respawn-interval` (3.5 s, its default, kept) and stops the old one: a reload of 2 "
               "workers takes 7 s.",
}


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (the kernel's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def dispatcher_has_interfaces() -> bool:
    """Whether this checkout's dispatcher serves ASGI and WSGI apps (``--interface`` in its ``--help``)."""
    try:
        done = subprocess.run([sys.executable, "-m", "dispatcher", "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--interface" in done.stdout


def _answers(port: int) -> bool:
    try:
        return http_error(ask(port, http_get(port, "/"), timeout=2.0)) == ""
    except OSError:
        return False


class Running(StartedOnEnter):
    """One server of ``kind`` with ``workers`` workers, started at once; ``start()`` waits until it serves.

    Parameters:
        threads: WSGI threads per worker.
        cpu: start it under ``taskset -c CPU`` (None: no pinning).
    """

    def __init__(self, kind: Kind, workers: int, threads: int = 4, cpu: int | None = None) -> None:
        self.kind = kind
        self.workers = workers
        self._ready_dir = tempfile.mkdtemp(prefix="peer-ready-")  # 0700
        env = {READY_DIR_ENV: self._ready_dir}
        pin = taskset(cpu)
        self._seen: dict[int, psutil.Process] = {}
        self._server: Server | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Path | None = None
        self._log_text = ""
        self.port = 0
        args = kind.arguments(workers, threads)
        if kind.dispatcher:
            self.command = [*pin, sys.executable, *args]
            self._server = Server(*args[2:], workers=workers, env=env,
                                  launcher=(*pin, sys.executable, *args[:2]))
            self.pid = self._server.pid
        else:
            self.port = free_port()
            args = kind.arguments(workers, threads, self.port)
            self.command = [*pin, sys.executable, *args]
            fd, name = tempfile.mkstemp(prefix=f"peer-{kind.key}-", suffix=".log")
            self._log_file = Path(name)
            try:
                self._proc = subprocess.Popen(self.command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=fd,
                                              stderr=subprocess.STDOUT, env={**os.environ, **env})
            finally:
                os.close(fd)
            self.pid = self._proc.pid
        self._remember()

    @property
    def log(self) -> str:
        if self._server is not None:
            return self._server.log
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                return self._log_file.read_text(errors="replace")
        return self._log_text

    def _exited(self) -> int | None:
        if self._server is not None:
            return self._server.proc.poll()
        assert self._proc is not None
        return self._proc.poll()

    def start(self, timeout: float = START_TIMEOUT_S) -> Running:
        """Wait until every worker has loaded the app and ``/`` answers ``200``; return self.

        Raises:
            StartError: it exited first, or was not ready within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        if self._server is not None:
            self._server.start(timeout)
            self.port = self._server.port
        while len(self.worker_pids()) < self.workers or not _answers(self.port):
            code = self._exited()
            if code is not None:
                raise StartError(f"{self.kind.label} exited with code {code} before it served; "
                                 f"log:\n{self.log}")
            if time.monotonic() >= deadline:
                raise StartError(f"{self.kind.label}: {len(self.worker_pids())} of {self.workers} workers "
                                 f"ready after {timeout:g} s; log:\n{self.log}")
            time.sleep(POLL_S)
        time.sleep(SETTLE_S)
        return self

    def _remember(self) -> list[psutil.Process]:
        """The server's live descendants, each remembered for the teardown."""
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []
        for child in children:
            self._seen.setdefault(child.pid, child)
        return children

    def process_pids(self) -> list[int]:
        """The server's first process and its live descendants."""
        return [self.pid, *(c.pid for c in self._remember())]

    def worker_pids(self) -> list[int]:
        """The live processes of the server that loaded the app (not the supervisor), sorted."""
        with contextlib.suppress(OSError):
            marked = {int(name) for name in os.listdir(self._ready_dir) if name.isdigit()}
            live = []
            for child in self._remember():
                with contextlib.suppress(psutil.Error):
                    if child.pid in marked and child.status() != psutil.STATUS_ZOMBIE:
                        live.append(child.pid)
            return sorted(live)
        return []

    def rss_bytes(self) -> dict[int, int]:
        """Each worker's resident set size."""
        return rss_of(self.worker_pids())

    def reload(self, timeout: float = RELOAD_TIMEOUT_S) -> str:
        """Replace every worker as the server does it (``ctl reload``, or SIGHUP); return how it went.

        Returns once every worker that ran before is gone and as many new ones
        have loaded the app, or the server answered (``ctl reload`` answers once
        every worker was replaced); ``failed: ...`` if not within ``timeout``.
        """
        before = set(self.worker_pids())
        deadline = time.monotonic() + timeout
        if self._server is not None:
            try:
                self._server.request("reload", timeout_s=timeout)
            except Exception as exc:  # CtlError, OSError: the report says what
                return f"failed: {type(exc).__name__}: {exc}"
        else:
            os.kill(self.pid, signal.SIGHUP)
        while True:
            now = set(self.worker_pids())
            if not now & before and len(now) >= self.workers:
                return "ok"
            if self._exited() is not None:
                return f"failed: the server exited with code {self._exited()}"
            if time.monotonic() >= deadline:
                return (f"failed: {len(now & before)} old and {len(now - before)} new workers "
                        f"after {timeout:g} s")
            time.sleep(POLL_S)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL whatever is left of it, by PID; idempotent."""
        self._remember()
        if self._server is not None:
            self._server.stop(timeout)
        elif self._proc is not None:
            end_process(self._proc, signal.SIGTERM, timeout, self.kind.label)
        for process in self._seen.values():
            # psutil checks the creation time first: a reused pid is left alone.
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    process.kill()
        shutil.rmtree(self._ready_dir, ignore_errors=True)
        if self._log_file is not None:  # kept in memory: the lab's .raw gets it
            self._log_text = self.log
            self._log_file.unlink(missing_ok=True)
            self._log_file = None


def describe(kind: Kind, workers: int, threads: int, cpu: int | None = None) -> str:
    """``kind``'s command line as the report gives it (PORT, DIR for what each run picks)."""
    line = [*taskset(cpu), python(), *kind.arguments(workers, threads)]
    if kind.dispatcher:
        line += ["--workers", str(workers), "--bind", f"{HOST}:0", "--control", "DIR/ctl.sock"]
    return shlex.join(line)


def kinds(keys: Sequence[str]) -> list[Kind]:
    return [KINDS[k] for k in keys]
