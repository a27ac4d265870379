"""The operator control socket: a Unix stream socket speaking JSON lines.

Theory of operation
-------------------
The master listens on ``<runtime dir>/dispatcher/<master pid>.sock`` (or the
``--control`` path) with asyncio's ``start_unix_server``; ``dispatcher ctl``
is the client. Access is checked twice: the default directory is 0700 and the
socket 0600, so only the owner can reach it through the file system, and each
connection's ``SO_PEERCRED`` is checked, so a socket made reachable by hand
(or the short window between ``bind`` and ``chmod``) still admits only the
master's own uid and root. Anyone else gets one error answer and is hung up
on, and the master logs who tried.

One request per line, one answer per line, in order, as many as the client
likes on one connection::

    {"cmd": "scale", "workers": 4}
    {"ok": true, "result": {"added": 2, "removed": 0, "workers": 4}}

A request the server cannot use (too long, not JSON, not an object, unknown
command, bad arguments) gets ``{"ok": false, "error": "..."}`` and the
connection stays usable; nothing a client sends can raise out of the
connection task or stop the master. A client that says nothing for
``REQUEST_TIMEOUT_S`` (or does not read its answers for as long) is closed.

The framing is ``dispatcher.control_protocol`` (sans-IO, shared with the
client in ``dispatcher.ctl``) and where the socket lives is
``dispatcher.rundir``; this module is the server. It sees the master only
as the ``Operations`` it carries out.

The socket file is the master's: ``start`` removes a stale one (a socket
nobody answers on) and refuses to replace a live one or anything that is not
a socket; ``close`` unlinks it only if it is still the one it bound.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from typing import Any, Final, Protocol

from dispatcher.control_protocol import (
    MAX_REQUEST_BYTES,
    LineReader,
    RequestError,
    TooLong,
    decode_request,
    error_answer,
    json_type,
    ok_answer,
)
from dispatcher.messages import MessageHandler
from dispatcher.rundir import ControlError, is_listening
from dispatcher.snapshot import Snapshot
from shared.exitcodes import ExitCode

log = logging.getLogger(__name__)

#: A client gets this long to finish each request, and to read each answer.
REQUEST_TIMEOUT_S: Final = 10.0
#: Worker messages kept for the ``messages`` command.
MESSAGES_KEPT: Final = 100
#: Control connections open at once; more are closed at once.
MAX_CONNECTIONS: Final = 64
#: How long ``ready`` waits by default, and at most.
READY_TIMEOUT_S: Final = 10.0
MAX_READY_TIMEOUT_S: Final = 3600.0
#: ``scale`` refuses more workers than this (a typo should not fork-bomb the host).
MAX_WORKERS: Final = 1024

#: How long a refused client gets to read its answer before it is hung up on.
_REFUSAL_LINGER_S: Final = 1.0

_PEERCRED: Final = struct.Struct("3i")


# Arguments


class Operations(Protocol):
    """What the control socket asks of the master."""

    @property
    def message_handlers(self) -> list[MessageHandler]: ...
    def snapshot(self) -> Snapshot: ...
    def scale(self, workers: int) -> tuple[int, int]: ...
    def request_stop(self, code: ExitCode = ExitCode.OK, graceful: bool = True) -> None: ...
    def send(self, worker_id: int | None, payload: Any) -> int: ...
    async def reload(self) -> str | None: ...
    async def wait_ready(self, timeout_s: float) -> bool: ...


def _int_arg(args: dict[str, Any], name: str, cmd: str) -> int:
    if name not in args:
        raise RequestError(f'{cmd} needs "{name}", a whole number')
    value = args[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f'{cmd}: "{name}" must be a whole number, not {json_type(value)}')
    return value


def _check_args(args: dict[str, Any], cmd: str, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise RequestError(f"{cmd}: unknown argument(s) {', '.join(map(repr, unknown))}")


# The server

#: What a command gives back: the result, and what to do once it is answered.
CommandResult = tuple[Any, Callable[[], None] | None]


class ControlServer:
    """Serves the control protocol on the Unix socket ``path``, carrying out ``operations``."""

    def __init__(self, operations: Operations, path: str) -> None:
        self.operations = operations
        self.path = path
        #: The last ``MESSAGES_KEPT`` worker messages, oldest first.
        self.messages: collections.deque[dict[str, Any]] = collections.deque(maxlen=MESSAGES_KEPT)
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._connections = 0
        self._commands: dict[str, Callable[[dict[str, Any]], CommandResult]] = {
            "status": self._status,
            "stats": self._status,
            "scale": self._scale,
            "stop": self._stop,
            "message": self._message,
            "messages": self._messages,
            "reload": self._reload,
            "ready": self._ready,
        }

    async def start(self) -> None:
        """Bind and listen on ``path`` (mode 0600), making its directory (0700) if missing.

        Raises:
            ControlError: the directory cannot be made, the path is in use by a
                live server, is not a socket, or cannot be bound. Nothing is left
                listening then.
        """
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ControlError(f"cannot create {parent}: {exc.strerror}") from None
        self._remove_stale()
        try:
            self._server = await asyncio.start_unix_server(
                self._serve_connection, path=self.path, limit=MAX_REQUEST_BYTES
            )
            os.chmod(self.path, 0o600)
            info = os.stat(self.path)
        except OSError as exc:
            if self._server is not None:  # bound, then chmod or stat failed
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            self.close()
            raise ControlError(f"cannot listen on control socket {self.path}: {exc.strerror}") from None
        self._inode = (info.st_dev, info.st_ino)
        self.operations.message_handlers.append(self._on_worker_message)

    def close(self) -> None:
        """Stop listening and remove the socket file (if it is still ours); idempotent.

        Connections already open are left to finish their current request.
        """
        with contextlib.suppress(ValueError):
            self.operations.message_handlers.remove(self._on_worker_message)
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._inode is not None:
            with contextlib.suppress(OSError):
                info = os.stat(self.path)
                if (info.st_dev, info.st_ino) == self._inode:
                    os.unlink(self.path)
            self._inode = None

    def _remove_stale(self) -> None:
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ControlError(f"cannot use control socket {self.path}: {exc.strerror}") from None
        if not stat.S_ISSOCK(info.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket; refusing to replace it")
        try:
            live = is_listening(self.path)
        except OSError as exc:
            raise ControlError(f"cannot probe control socket {self.path}: {exc}") from None
        if live:
            raise ControlError(f"control socket {self.path} is in use by a running process")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        log.info("removed stale control socket %s", self.path)

    # Connections

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        try:
            if self._connections > MAX_CONNECTIONS:
                log.warning("control connection refused: %d already open", MAX_CONNECTIONS)
                return
            if self._admit(writer):
                await self._converse(reader, writer)
            else:
                await asyncio.wait_for(self._hang_up(reader, writer), _REFUSAL_LINGER_S)
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("control connection failed")
        finally:
            self._connections -= 1
            writer.close()

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        """Check the peer's credentials; answer and log a refusal."""
        sock = writer.get_extra_info("socket")
        try:
            pid, uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
        except (OSError, AttributeError, struct.error) as exc:
            log.warning("control connection refused: cannot read its credentials: %s", exc)
            writer.write(error_answer("permission denied: cannot read peer credentials"))
            return False
        if uid in (0, os.geteuid()):
            return True
        allowed = "root" if os.geteuid() == 0 else f"uid {os.geteuid()} and root"
        log.warning("control connection from uid %d (pid %d) refused: only %s may use it", uid, pid, allowed)
        writer.write(error_answer(f"permission denied: uid {uid} is not allowed"))
        return False

    async def _hang_up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Closing with the client's request unread would reset the connection,
        # and the client could lose the answer; read it (briefly) first.
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        discarded = 0
        while discarded <= MAX_REQUEST_BYTES:
            data = await reader.read(65536)
            if not data:
                return
            discarded += len(data)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines = LineReader(MAX_REQUEST_BYTES)
        loop = asyncio.get_running_loop()
        while True:
            # The deadline covers the whole request, so trickling bytes buys no time.
            deadline = loop.time() + REQUEST_TIMEOUT_S
            events: list[bytes | TooLong] = []
            while not events:
                data = await asyncio.wait_for(reader.read(65536), max(0.0, deadline - loop.time()))
                if not data:
                    return
                events = lines.feed(data)
            for event in events:
                answer, then = await self._answer(event)
                writer.write(answer)
                await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
                if then is not None:
                    then()

    async def _answer(self, line: bytes | TooLong) -> tuple[bytes, Callable[[], None] | None]:
        try:
            cmd, args = decode_request(line)
            command = self._commands.get(cmd)
            if command is None:
                raise RequestError(f"unknown command {cmd!r}; known: {', '.join(sorted(self._commands))}")
            result, then = command(args)
            if inspect.isawaitable(result):
                # A long command (reload): this connection waits for it, others go on.
                result = await result
        except RequestError as exc:
            return error_answer(str(exc)), None
        except Exception as exc:
            log.exception("control request failed")
            return error_answer(f"internal error: {type(exc).__name__}: {exc}"), None
        return ok_answer(result), then

    # Commands

    def _status(self, args: dict[str, Any]) -> CommandResult:
        _check_args(args, "status", ())
        return self.operations.snapshot(), None

    def _scale(self, args: dict[str, Any]) -> CommandResult:
        _check_args(args, "scale", ("workers",))
        workers = _int_arg(args, "workers", "scale")
        if workers > MAX_WORKERS:
            raise RequestError(f"scale: at most {MAX_WORKERS} workers")
        try:
            added, removed = self.operations.scale(workers)
        except ValueError as exc:
            raise RequestError(f"scale: {exc}") from None
        return {"added": added, "removed": removed, "workers": workers}, None

    def _stop(self, args: dict[str, Any]) -> CommandResult:
        _check_args(args, "stop", ("graceful",))
        graceful = args.get("graceful", True)
        if not isinstance(graceful, bool):
            raise RequestError(f'stop: "graceful" must be a boolean, not {json_type(graceful)}')
        log.info("stop requested on the control socket (%s)", "graceful" if graceful else "fast")

        def stop() -> None:
            self.operations.request_stop(ExitCode.OK, graceful=graceful)

        return {"stopping": True}, stop

    def _message(self, args: dict[str, Any]) -> CommandResult:
        _check_args(args, "message", ("payload", "worker"))
        if "payload" not in args:
            raise RequestError('message needs "payload"')
        worker = args.get("worker")
        if worker is not None:
            worker = _int_arg(args, "worker", "message")
        try:
            sent = self.operations.send(worker, args["payload"])
        except ValueError as exc:
            raise RequestError(f"message: {exc}") from None
        return {"sent": sent}, None

    def _reload(self, args: dict[str, Any]) -> CommandResult:
        _check_args(args, "reload", ())

        async def reload() -> dict[str, Any]:
            error = await self.operations.reload()
            if error is not None:
                raise RequestError(f"reload failed: {error}")
            return {"reloaded": len(self.operations.snapshot()["workers"])}

        return reload(), None

    def _ready(self, args: dict[str, Any]) -> CommandResult:
        _check_args(args, "ready", ("timeout",))
        timeout = args.get("timeout", READY_TIMEOUT_S)
        number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
        if not number or not 0 <= timeout <= MAX_READY_TIMEOUT_S:
            raise RequestError(
                f'ready: "timeout" must be a number of seconds from 0 to {MAX_READY_TIMEOUT_S:g}'
            )

        async def ready() -> Snapshot:
            # Waits on the master's own events (a worker ready, a worker gone), not a poll.
            if not await self.operations.wait_ready(float(timeout)):
                snapshot = self.operations.snapshot()
                if snapshot["master"]["stopping"]:
                    raise RequestError("ready: the master is stopping")
                workers = snapshot["workers"]
                count = sum(1 for w in workers if w["state"] == "ready")
                raise RequestError(f"ready: {count} of {len(workers)} worker(s) ready after {timeout:g} s")
            return self.operations.snapshot()

        return ready(), None

    def _messages(self, args: dict[str, Any]) -> CommandResult:
        _check_args(args, "messages", ())
        return list(self.messages), None

    def _on_worker_message(self, worker_id: int, payload: Any) -> None:
        self.messages.append({"worker": worker_id, "payload": payload})
