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
connection task or stop the master.

Connections are few and short-lived, so that an operator is never locked
out:

- One that sends no complete request for ``IDLE_TIMEOUT_S`` (counted from
  its last answer) gets an error answer saying so and is closed. One that is
  carrying out a command (a ``ready`` that waits, a ``reload``) is not idle,
  however long the command takes. One that does not read an answer for
  ``ANSWER_TIMEOUT_S`` is closed.
- At most ``MAX_CONNECTIONS`` are open. Past that, a new connection (from a
  uid let in) takes the place of the idlest one, which is told why before it
  is closed; only when every open connection is carrying out a command is
  the new one refused, with an answer that says so.
- Refusals come in bursts (a script retrying in a loop): the first is
  logged, and the burst is summed up in one line once it is over (a
  connection is let in again, or none was refused for ``_REFUSALS_QUIET_S``).

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
from dataclasses import dataclass
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
from shared.episode import Episode
from shared.exitcodes import ExitCode

log = logging.getLogger(__name__)

#: A connection with no complete request for this long is told so and closed.
#: ``ctl`` (and a script speaking the protocol) sends its request as soon as it
#: has connected, so a connection quiet for this long is stuck or forgotten;
#: short, so that such connections give their places (``MAX_CONNECTIONS``)
#: back within seconds.
IDLE_TIMEOUT_S: Final = 2.0
#: A client gets this long to read each answer.
ANSWER_TIMEOUT_S: Final = 10.0
#: Worker messages kept for the ``messages`` command.
MESSAGES_KEPT: Final = 100
#: Control connections open at once; past it the idlest makes room, or the new one is refused.
MAX_CONNECTIONS: Final = 64
#: How long ``ready`` waits by default, and at most.
READY_TIMEOUT_S: Final = 10.0
MAX_READY_TIMEOUT_S: Final = 3600.0
#: ``scale`` refuses more workers than this (a typo should not fork-bomb the host).
MAX_WORKERS: Final = 1024

#: How long a refused client gets to read its answer before it is hung up on.
_REFUSAL_LINGER_S: Final = 1.0
#: Refusals less than this apart are one burst, logged as it begins and summed up once it is over.
#: Long enough that a script retrying every few seconds makes one burst, not a line per try.
_REFUSALS_QUIET_S: Final = 5.0

_TOO_MANY: Final = f"the master has too many control connections open ({MAX_CONNECTIONS})"

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


@dataclass(eq=False, slots=True)
class _Connection:
    """A connection let in, as the cap sees it."""

    writer: asyncio.StreamWriter
    #: When it began to wait for a request; None while it carries one out.
    idle_since: float | None
    #: Closed to make room for a newer one: nothing it sent since is carried out.
    evicted: bool = False


class ControlServer:
    """Serves the control protocol on the Unix socket ``path``, carrying out ``operations``."""

    def __init__(self, operations: Operations, path: str) -> None:
        self.operations = operations
        self.path = path
        #: The last ``MESSAGES_KEPT`` worker messages, oldest first.
        self.messages: collections.deque[dict[str, Any]] = collections.deque(maxlen=MESSAGES_KEPT)
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        #: The connections let in, oldest first.
        self._open: dict[_Connection, None] = {}
        #: Refused connections being given time to read their answer.
        self._lingering = 0
        #: Connections refused in the current burst, when the last one was, and when to look again.
        #: Refusals, one episode per burst (made once the loop runs, in ``start``).
        self._refusals: Episode | None = None
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
        if self._refusals is not None:
            self._refusals.end()
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
        connection: _Connection | None = None
        try:
            # Credentials first: a uid that is not let in takes no one's place.
            if not self._admit(writer):
                await self._turn_away(reader, writer)
                return
            connection = self._make_room(writer)
            if connection is None:
                self._note_refusal()
                writer.write(error_answer(f"{_TOO_MANY}, every one busy with a command; try again later"))
                await self._turn_away(reader, writer)
                return
            await self._converse(reader, writer, connection)
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("control connection failed")
        finally:
            if connection is not None:
                self._open.pop(connection, None)
            writer.close()

    def _make_room(self, writer: asyncio.StreamWriter) -> _Connection | None:
        """Let a new connection in, closing the idlest if at the cap; None if every one is busy."""
        loop = asyncio.get_running_loop()
        if len(self._open) >= MAX_CONNECTIONS:
            # Oldest first among equals: the dict keeps the order they came in.
            waiting = [(c.idle_since, c) for c in self._open if c.idle_since is not None]
            if not waiting:
                return None
            idle_since, idlest = min(waiting, key=lambda pair: pair[0])
            del self._open[idlest]
            idlest.evicted = True
            idlest.writer.write(error_answer(f"closed to make room: {_TOO_MANY} and this one was the idlest"))
            idlest.writer.close()
            log.debug("control connection closed to make room (idle for %.1f s)", loop.time() - idle_since)
        if self._refusals is not None:
            self._refusals.end()  # one got in: the refusals, if any, are over
        connection = _Connection(writer, idle_since=loop.time())
        self._open[connection] = None
        return connection

    async def _turn_away(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Give a refused client (its answer written) a moment to read it, then hang up."""
        if self._lingering >= MAX_CONNECTIONS:
            # A flood of refusals must not hold the master's fds: these are
            # closed at once (a Unix socket keeps the answer for the client).
            return
        self._lingering += 1
        try:
            await asyncio.wait_for(self._hang_up(reader, writer), _REFUSAL_LINGER_S)
        finally:
            self._lingering -= 1

    # Refusals, logged once per burst

    def _note_refusal(self) -> None:
        if self._refusals is None:
            self._refusals = Episode(asyncio.get_running_loop(), _REFUSALS_QUIET_S,
                                     self._refusals_began, self._refusals_ended)
        self._refusals.happened()

    @staticmethod
    def _refusals_began() -> None:
        log.warning("control connection refused: %d open, every one busy with a command "
                    "(more refusals are counted, and summed up once they stop)", MAX_CONNECTIONS)

    @staticmethod
    def _refusals_ended(refused: int, _span_s: float) -> None:
        if refused > 1:  # else its first line said it all
            log.warning("refused %d control connection(s) in all while %d were open and busy",
                        refused, MAX_CONNECTIONS)

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

    async def _converse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: _Connection
    ) -> None:
        lines = LineReader(MAX_REQUEST_BYTES)
        loop = asyncio.get_running_loop()
        while True:
            # Idle until a whole request has come: trickling bytes buys no time.
            connection.idle_since = loop.time()
            deadline = connection.idle_since + IDLE_TIMEOUT_S
            events: list[bytes | TooLong] = []
            while not events:
                data: bytes | None
                try:
                    data = await asyncio.wait_for(reader.read(65536), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    data = None
                if connection.evicted:
                    return  # told why, and closed, by the connection that took its place
                if data is None:
                    writer.write(error_answer(
                        f"idle timeout: no request within {IDLE_TIMEOUT_S:g} s; closing the connection"))
                    return
                if not data:
                    return
                events = lines.feed(data)
            # Busy, so not closed to make room, until every request read is answered.
            connection.idle_since = None
            for event in events:
                answer, then = await self._answer(event)
                writer.write(answer)
                await asyncio.wait_for(writer.drain(), ANSWER_TIMEOUT_S)
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
