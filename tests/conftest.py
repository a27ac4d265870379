"""Helpers for tests that run a real master with real workers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"worker (\d+) \(pid (\d+)\) ready")
LISTENING = re.compile(r"listening on (\S+)")


class Server:
    """A ``python -m dispatcher`` process whose log is read line by line."""

    def __init__(self, *args: str, workers: int = 2, env: dict[str, str] | None = None,
                 bind: str | None = "127.0.0.1:0", launcher: list[str] | None = None,
                 pass_fds: tuple[int, ...] = ()) -> None:
        command = [*(launcher or [sys.executable, "-m", "dispatcher"]), *args]
        if workers:
            command += ["--workers", str(workers)]
        if bind:
            command += ["--bind", bind]
        self.proc = subprocess.Popen(
            command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, text=True, pass_fds=pass_fds,
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._seen_pids: set[int] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.address = ""
        self.port = 0

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_line(self, pattern: str | re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:
        """Return the first match of ``pattern`` in a log line not yet consumed."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no log line matching {regex.pattern!r}; log:\n{self.log}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise EOFError(f"server exited before {regex.pattern!r}; log:\n{self.log}")
            match = regex.search(line)
            if match:
                return match

    def start(self, ready: int | None = None, timeout: float = 15.0) -> Server:
        """Wait for the listening address and ``ready`` workers; return self."""
        self.address = self.wait_line(LISTENING, timeout).group(1)
        if not self.address.startswith("unix:"):
            self.port = int(self.address.rsplit(":", 1)[1])
        for _ in range(ready or 0):
            self._seen_pids.add(int(self.wait_line(READY, timeout).group(2)))
        return self

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def worker_pids(self) -> list[int]:
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        pids = [c.pid for c in children]
        self._seen_pids.update(pids)
        return pids

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 10.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def kill_all(self) -> None:
        """End the master and every worker it ever had, by PID."""
        pids = {self.pid, *self._seen_pids, *self.worker_pids()}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


@pytest.fixture
def server_factory() -> Iterator[type[Server]]:
    servers: list[Server] = []

    class Tracked(Server):
        def __init__(self, *args: str, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            servers.append(self)

    yield Tracked
    for server in servers:
        server.kill_all()


def app_env(folder: Path) -> dict[str, str]:
    """Environment for a server whose app module is written into ``folder`` (and may be rewritten).

    Bytecode is not cached, so a rewrite of the same size in the same second is still seen.
    """
    return {"PYTHONPATH": f"{folder}:{os.environ.get('PYTHONPATH', '')}", "PYTHONDONTWRITEBYTECODE": "1"}


def ask(port: int, line: bytes = b"hi\n", timeout: float = 10.0, host: str = "127.0.0.1") -> str:
    """Connect, send ``line``, return everything the server says until it closes."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(line)
        return read_all(sock)


def read_all(sock: socket.socket) -> str:
    chunks = []
    while True:
        data = sock.recv(4096)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode()


def wait_for(predicate: object, timeout: float, what: str) -> None:
    """For state with no event to wait on (another process's /proc): check until true."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


@contextlib.contextmanager
def fd_table_full(room: int) -> Iterator[None]:
    """Within the block this process can open only ``room`` more fds (RLIMIT_NOFILE, restored after).

    Every free slot below the lowered limit, holes included, is taken by
    /dev/null, then ``room`` of them are given back.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        highest = max(int(name) for name in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8 + room, hard))
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        for _ in range(room):
            os.close(fillers.pop())
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
