"""The dispatcher under test: one ``python -m dispatcher`` process, for the tests and the lab alike.

``Server(*args)`` starts the master at once, from the repository root,
bound to 127.0.0.1 port 0 unless told otherwise, and reads its stderr line
by line on a thread, so that ``wait_line`` can wait for a log line a test
checks as behaviour. Unless ``args`` name a ``--control`` socket, it gets
one in a private (0700) temporary directory.

``start()`` learns the rest from that control socket, never from the log's
wording: it waits until the socket accepts connections, then sends
``ready``, which the master answers only once every worker it wants is
ready, with its status snapshot: the listening addresses and the workers'
pids. A server that exits first, or refuses, raises ``StartError`` with its
log.

The log is read by a thread, so a line the master wrote before an answer
on the control socket may not be in ``lines`` yet when the answer arrives:
``sync_log`` has the thread read everything written until now (it wakes
the thread through a pipe and waits for it to have drained stderr).
``start`` does so, then leaves to ``wait_line`` only the lines that come
after: those of a restart, a reload, a stop.

Every process it started, the master and each worker pid it ever saw, is
ended by PID: ``kill()`` at once (the tests), ``stop()`` with SIGTERM
first and SIGKILL for what is left (the lab).
"""

from __future__ import annotations

import abc
import contextlib
import os
import queue
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from signal import Signals
from types import TracebackType
from typing import Any, Self

import psutil

from dispatcher.ctl import READY_SLACK_S, TIMEOUT_S, CtlError, request
from dispatcher.rundir import is_listening
from dispatcher.snapshot import Snapshot

ROOT = Path(__file__).resolve().parent.parent
#: The only address the lab and the tests bind and load.
HOST = "127.0.0.1"
#: Bound on ``start``: the control socket, then every worker ready.
START_TIMEOUT_S = 20.0
#: How long ``stop`` lets a SIGTERM'd master take before it is killed.
STOP_TIMEOUT_S = 15.0
#: How long a failed ``ready`` waits for the master to exit, for its exit code.
EXIT_GRACE_S = 1.0
#: How often ``start`` looks for the control socket (a file appearing is no event to wait on).
SOCKET_POLL_S = 0.02


class StartError(RuntimeError):
    """The server did not get ready: it exited, refused, or took too long. The message has its log."""


def command(*args: str, workers: int = 2, bind: str | None = f"{HOST}:0",
            launcher: Sequence[str] = (sys.executable, "-m", "dispatcher")) -> list[str]:
    """The master's command line: ``launcher``, ``args``, then ``--workers`` and ``--bind`` if given.

    ``workers`` 0 and ``bind`` None leave those to the master's defaults.
    """
    line = [*launcher, *args]
    if workers:
        line += ["--workers", str(workers)]
    if bind:
        line += ["--bind", bind]
    return line


def _control_of(args: Sequence[str]) -> str | None:
    """The ``--control`` value in ``args``, or None if they name none."""
    for i, arg in enumerate(args):
        if arg == "--control" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--control="):
            return arg.partition("=")[2]
    return None


def end_process(proc: subprocess.Popen[bytes], sig: Signals, timeout: float, who: str) -> int | None:
    """``sig`` to ``proc`` by PID unless it has exited, wait up to ``timeout``, then SIGKILL it.

    Returns:
        Its exit code (None if even SIGKILL did not end it within 5 s).
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"  {who} {proc.pid} still running {timeout:g} s after {sig.name}: killing", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(5.0)
    return None


class StartedOnEnter(abc.ABC):
    """A process that ``with`` starts (stopped if the start fails) and stops by PID however the block ends."""

    @abc.abstractmethod
    def start(self) -> Self:
        """Wait until it is ready; return self."""

    @abc.abstractmethod
    def stop(self) -> object:
        """End it and every process it started."""

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class Server(StartedOnEnter):
    """A ``python -m dispatcher`` process: its log, its control socket, its processes.

    Parameters:
        args: the master's arguments (``--app`` at least).
        workers: ``--workers``; 0 passes none (``WEB_CONCURRENCY`` or the CPU count).
        bind: ``--bind``; None passes none (for several binds or an inherited socket, in ``args``).
        env: environment variables set for the master, on top of this process's.
        launcher: what runs the master (default this interpreter's ``-m dispatcher``).
        pass_fds: fds the master inherits.
        private_control: unless ``args`` name a control socket, give it one in a
            private directory; False passes no ``--control``, so the master uses
            its default path: set ``control_path`` to it before ``start()``.
    """

    def __init__(self, *args: str, workers: int = 2, bind: str | None = f"{HOST}:0",
                 env: Mapping[str, str] | None = None,
                 launcher: Sequence[str] = (sys.executable, "-m", "dispatcher"),
                 pass_fds: Sequence[int] = (), private_control: bool = True) -> None:
        named = _control_of(args)
        self._private_dir: str | None = None
        #: The control socket ``start`` and ``request`` use; None: it has none.
        self.control_path: str | None = None if named == "none" else named
        extra: list[str] = []
        if named is None and private_control:
            self._private_dir = tempfile.mkdtemp(prefix="dispatcher-server-")  # mode 0700
            self.control_path = os.path.join(self._private_dir, "ctl.sock")
            extra = ["--control", self.control_path]
        self.command = command(*args, *extra, workers=workers, bind=bind, launcher=launcher)
        self.lines: list[str] = []
        #: Filled by ``start``: the master's listening addresses, the first TCP port, the snapshot.
        self.addresses: list[str] = []
        self.address = ""
        self.port = 0
        self.ready_snapshot: Snapshot
        #: The master's exit code, once ``wait``, ``stop`` or ``kill`` saw it.
        self.exit_code: int | None = None
        self._seen: dict[int, psutil.Process] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        # sync_log's tickets: asked for, and the last one the reader answered by draining stderr.
        self._synced = threading.Condition()
        self._asked = self._answered = 0
        try:
            self.proc = subprocess.Popen(
                self.command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, env={**os.environ, **(env or {})}, pass_fds=tuple(pass_fds),
            )
        except BaseException:
            self._remove_private_dir()
            raise
        self.pid = self.proc.pid
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._reader = threading.Thread(target=self._read, name=f"stderr-{self.pid}", daemon=True)
        self._reader.start()

    # The log

    def _read(self) -> None:
        assert self.proc.stderr is not None
        stderr = self.proc.stderr.fileno()
        os.set_blocking(stderr, False)
        partial = b""
        with selectors.DefaultSelector() as selector:
            selector.register(stderr, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            done = False
            while not done:
                selector.select()
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_read, 4096)
                with self._synced:
                    asked = self._asked  # taken before the drain: every byte written before it is read
                while True:
                    try:
                        chunk = os.read(stderr, 65536)
                    except BlockingIOError:
                        break
                    done = not chunk
                    *complete, partial = (partial + chunk).split(b"\n")
                    if done and partial:
                        complete.append(partial)
                    for raw in complete:
                        line = raw.decode(errors="replace") + "\n"
                        self.lines.append(line)
                        self._queue.put(line)
                    if done:
                        break
                with self._synced:
                    self._answered = asked
                    self._synced.notify_all()
        self._queue.put(None)

    def sync_log(self, timeout: float = 10.0) -> None:
        """Return once ``lines`` holds every line the server wrote to stderr before this call.

        Raises:
            TimeoutError: the reader did not get there within ``timeout`` seconds.
        """
        with self._synced:
            self._asked += 1
            ticket = self._asked
        with contextlib.suppress(OSError):  # closed: the reader has finished
            os.write(self._wake_write, b"\0")
        with self._synced:
            if not self._synced.wait_for(lambda: self._answered >= ticket or not self._reader.is_alive(),
                                         timeout):
                raise TimeoutError(f"the log of server {self.pid} was not read within {timeout:g} s")

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_line(self, pattern: str | re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:
        """Return the first match of ``pattern`` in a log line that no earlier call consumed.

        Raises:
            TimeoutError: no such line within ``timeout`` seconds.
            EOFError: the server exited first.
        """
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

    # Ready, over the control socket

    def start(self, timeout: float = START_TIMEOUT_S) -> Server:
        """Wait until every worker is ready; learn the addresses and worker pids; return self.

        Raises:
            StartError: the server has no control socket, exited first, refused
                (``ready`` answered an error) or was not ready within ``timeout``.
        """
        if self.control_path is None:
            raise StartError(
                "start() asks the control socket, and this server has none (--control none, or "
                "private_control=False without control_path): wait on what it does instead"
            )
        deadline = time.monotonic() + timeout
        # A file appearing is no event to wait on: look again every SOCKET_POLL_S, bounded.
        while not self._control_accepts():
            if self.proc.poll() is not None:
                raise self._failure("exited before its control socket accepted connections")
            if time.monotonic() >= deadline:
                raise self._failure(f"had no control socket at {self.control_path} after {timeout:g} s")
            time.sleep(SOCKET_POLL_S)
        snapshot = self.wait_ready(max(0.0, deadline - time.monotonic()))
        self._wait_control_closed(deadline)
        self.sync_log()
        with contextlib.suppress(queue.Empty):
            while True:
                if self._queue.get_nowait() is None:  # it has exited already: wait_line says so
                    self._queue.put(None)
                    break
        self.ready_snapshot = snapshot
        self.addresses = [str(a) for a in snapshot["master"]["listening"]]
        self.address = self.addresses[0] if self.addresses else ""
        tcp = next((a for a in self.addresses if not a.startswith("unix:")), "")
        self.port = int(tcp.rsplit(":", 1)[1]) if tcp else 0
        return self

    def wait_ready(self, timeout: float = 10.0) -> Snapshot:
        """Send ``ready``: the snapshot once every wanted worker is ready (the master waits on its events).

        Raises:
            StartError: not ready within ``timeout``, the master is stopping, or it is gone.
        """
        try:
            snapshot: Snapshot = self.request("ready", timeout_s=timeout + READY_SLACK_S,
                                              timeout=round(timeout, 3))
        except CtlError as exc:
            # A master that refuses because it is stopping exits a moment later: say with what.
            raise self._failure(str(exc), exit_grace_s=EXIT_GRACE_S) from None
        return snapshot

    def _wait_control_closed(self, deadline: float) -> None:
        """Wait until the master has closed the control connections ``start`` made.

        It closes each once it reads the EOF, a moment after the answer; until
        then it holds an fd more, and tests count the master's fds. Another
        process's fd table is no event to wait on: look again, bounded.
        """
        while True:
            try:
                # A Unix socket's laddr is its path; an accepted one has its listener's.
                held = [c for c in psutil.Process(self.pid).net_connections("unix")
                        if isinstance(c.laddr, str) and c.laddr == self.control_path]
            except psutil.Error:
                return  # gone: what it held went with it
            if len(held) <= 1:  # the listening socket only
                return
            if time.monotonic() >= deadline:
                raise self._failure(f"still holds {len(held) - 1} control connection(s) start() closed")
            time.sleep(SOCKET_POLL_S)

    def _control_accepts(self) -> bool:
        assert self.control_path is not None
        try:
            return is_listening(self.control_path)
        except OSError:
            return False

    def _failure(self, what: str, exit_grace_s: float = 0.0) -> StartError:
        """The error, with the exit code if it exits within ``exit_grace_s``, and the log so far."""
        try:
            code: int | None = self.proc.wait(exit_grace_s)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None:
            self._reader.join(5.0)  # the whole log, to the end
            what = f"{what}; it exited with code {code}"
        else:
            with contextlib.suppress(TimeoutError):
                self.sync_log()
        return StartError(f"server {self.pid} {what}; log:\n{self.log}")

    def request(self, cmd: str, timeout_s: float = TIMEOUT_S, **args: Any) -> Any:
        """One control request (``dispatcher.ctl.request``); worker pids in a status are remembered.

        Raises:
            CtlError: no control socket, no answer in time, or an error answer.
        """
        if self.control_path is None:
            raise CtlError("this server has no control socket")
        result = request(self.control_path, cmd, timeout_s=timeout_s, **args)
        if isinstance(result, dict):
            for key in ("workers", "draining"):
                self._remember(w["pid"] for w in result.get(key, ()) if w.get("pid"))
        return result

    def status(self) -> Snapshot:
        """The master's snapshot (``ctl status``)."""
        snapshot: Snapshot = self.request("status")
        return snapshot

    # The processes

    def worker_pids(self) -> list[int]:
        """The master's live child processes (draining workers too), remembered for teardown."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.Error:
            return []
        for child in children:
            self._seen.setdefault(child.pid, child)
        return [c.pid for c in children]

    def _remember(self, pids: Iterable[int]) -> None:
        for pid in pids:
            if pid not in self._seen:
                with contextlib.suppress(psutil.Error):
                    self._seen[pid] = psutil.Process(pid)

    def listening_sockets(self) -> list[str]:
        """``HOST:PORT`` of each TCP socket the master listens on, as the kernel has them."""
        try:
            sockets = psutil.Process(self.pid).net_connections("tcp")
        except psutil.Error:
            return []
        return [f"[{c.laddr.ip}]:{c.laddr.port}" if ":" in c.laddr.ip else f"{c.laddr.ip}:{c.laddr.port}"
                for c in sockets if c.status == psutil.CONN_LISTEN]

    def metrics_address(self) -> str:
        """The metrics endpoint's ``HOST:PORT``: the master's listening socket that serves no clients.

        ``status`` names the client listeners only; the kernel knows them all.

        Raises:
            RuntimeError: not exactly one such socket.
        """
        others = [a for a in self.listening_sockets() if a not in self.addresses]
        if len(others) != 1:
            raise RuntimeError(f"no single metrics socket: {others} besides {self.addresses}")
        return others[0]

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def signal(self, sig: Signals) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the master to exit; return its exit code (and read its log to the end)."""
        self.exit_code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return self.exit_code

    def kill(self) -> None:
        """SIGKILL the master and every worker it ever had, by PID; idempotent."""
        self._end(signal.SIGKILL, 5.0)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL the master and any worker left.

        Returns:
            The master's exit code (None if even SIGKILL did not end it within 5 s).
        """
        return self._end(signal.SIGTERM, timeout)

    def _end(self, sig: Signals, timeout: float) -> int | None:
        self.worker_pids()
        self.exit_code = end_process(self.proc, sig, timeout, "master")
        for process in self._seen.values():
            # psutil checks the process's creation time first: a reused pid is left alone.
            with contextlib.suppress(psutil.Error):
                if process.is_running():
                    if sig is signal.SIGTERM:  # a graceful stop ends its workers first
                        print(f"  worker {process.pid} outlived the master: killing", file=sys.stderr)
                    process.kill()
        self._close()
        return self.exit_code

    def _close(self) -> None:
        self._reader.join(5.0)
        if not self._reader.is_alive() and self._wake_write >= 0:
            assert self.proc.stderr is not None
            self.proc.stderr.close()
            os.close(self._wake_read)
            os.close(self._wake_write)
            self._wake_read = self._wake_write = -1
        self._remove_private_dir()

    def _remove_private_dir(self) -> None:
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None
