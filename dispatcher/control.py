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

The framing (``LineReader``, ``encode``, ``decode_request``,
``decode_answer``) is sans-IO and shared with the synchronous client in
``dispatcher.ctl``; only ``ControlServer`` touches sockets.

The socket file is the master's: ``start`` removes a stale one (a socket
nobody answers on) and refuses to replace a live one or anything that is not
a socket; ``close`` unlinks it only if it is still the one it bound.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import inspect
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from shared.exitcodes import ExitCode

if TYPE_CHECKING:
    from dispatcher.master import Master

log = logging.getLogger("master")

#: The longest request line accepted, newline excluded.
MAX_REQUEST_BYTES: Final = 64 * 1024
#: The longest answer line a client accepts (a snapshot of many workers).
MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024
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


class ControlError(OSError):
    """The control socket cannot be set up; the message says why in one line.

    An ``OSError``: like a failed bind, it is the host's state, not a bug.
    """


class RequestError(Exception):
    """A request the server cannot carry out; the message is the error answer."""


# Where the socket lives


def runtime_dir(create: bool = True) -> str:
    """Return the directory for control sockets, ``<runtime dir>/dispatcher``.

    The runtime dir is ``$XDG_RUNTIME_DIR`` if it names a directory, else
    ``/run/user/<uid>`` if it exists, else ``/tmp/dispatcher-<uid>`` (made
    0700 here, since /tmp is shared).

    Parameters:
        create: make the directory (mode 0700) when it is missing.

    Raises:
        ControlError: a directory on the way is not this user's, or others may
            write to it (group/other permission bits set), or cannot be made.
    """
    uid = os.geteuid()
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if not (base and os.path.isdir(base)):
        base = f"/run/user/{uid}"
        if not os.path.isdir(base):
            base = f"/tmp/dispatcher-{uid}"
            _private_dir(base, create)
    path = os.path.join(base, "dispatcher")
    _private_dir(path, create)
    return path


def default_path() -> str:
    """Return ``<runtime dir>/dispatcher/<this pid>.sock``, making the directory if needed.

    Sockets left there by masters that died without removing them (killed:
    their pid is gone and nobody listens) are removed on the way.

    Raises:
        ControlError: as ``runtime_dir``.
    """
    directory = runtime_dir(create=True)
    _remove_dead(directory)
    return os.path.join(directory, f"{os.getpid()}.sock")


def socket_pid(name: str) -> int | None:
    """Return the master pid a default socket's file name stands for, or None."""
    stem, dot, ext = name.partition(".")
    return int(stem) if dot and ext == "sock" and stem.isdigit() else None


def pid_alive(pid: int) -> bool:
    """Return whether process ``pid`` exists (maybe as someone else's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_listening(path: str, timeout_s: float = 1.0) -> bool:
    """Return whether a server accepts connections on the Unix socket ``path``.

    Raises:
        OSError: the probe failed another way (permissions, timeout).
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(timeout_s)
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        probe.close()
    return True


def _remove_dead(directory: str) -> None:
    names: list[str] = []
    with contextlib.suppress(OSError):
        names = os.listdir(directory)
    for name in names:
        pid = socket_pid(name)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode) and not is_listening(path):
                os.unlink(path)


def _private_dir(path: str, create: bool) -> None:
    """Check that ``path`` is a directory only this user can use; make it if asked."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ControlError(f"cannot create control directory {path}: {exc.strerror}") from None
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if create:
            raise ControlError(f"control directory {path} vanished") from None
        return
    except OSError as exc:
        raise ControlError(f"cannot use control directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ControlError(f"control directory {path} is not a directory; refusing to use it")
    if info.st_uid != os.geteuid():
        raise ControlError(
            f"control directory {path} belongs to uid {info.st_uid}, not {os.geteuid()}; "
            "refusing to use it"
        )
    if info.st_mode & 0o077:
        raise ControlError(
            f"control directory {path} has mode {stat.S_IMODE(info.st_mode):04o}, "
            "open to group or others; refusing to use it (chmod 700 it or remove it)"
        )


# The protocol, sans IO


@dataclass(frozen=True, slots=True)
class TooLong:
    """A line longer than the limit arrived; its bytes were dropped."""

    limit: int


class LineReader:
    """Split a byte stream into lines of at most ``limit`` bytes.

    ``feed`` returns, in order, each complete line (without its newline) and
    a ``TooLong`` for each line over the limit, whose bytes are skipped up to
    its newline so that the next line is read normally.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._skipping = False

    @property
    def partial(self) -> bool:
        """True when part of a line has arrived (or is being skipped)."""
        return bool(self._buffer) or self._skipping

    def feed(self, data: bytes) -> list[bytes | TooLong]:
        events: list[bytes | TooLong] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            elif len(self._buffer) + end - start > self.limit:
                self._buffer.clear()
                events.append(TooLong(self.limit))
            else:
                self._buffer += data[start:end]
                events.append(bytes(self._buffer))
                self._buffer.clear()
            start = end + 1
        if not self._skipping:
            self._buffer += data[start:]
            if len(self._buffer) > self.limit:
                self._buffer.clear()
                self._skipping = True
                events.append(TooLong(self.limit))
        return events


def encode(message: dict[str, Any]) -> bytes:
    """Return ``message`` as one JSON line.

    Raises:
        ValueError: ``message`` is not JSON-serialisable.
    """
    try:
        text = json.dumps(message, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON-serialisable: {exc}") from None
    return text.encode() + b"\n"


def _decode_object(line: bytes | TooLong, what: str) -> dict[str, Any]:
    if isinstance(line, TooLong):
        raise RequestError(f"{what} longer than {line.limit} bytes")
    try:
        value = json.loads(line)
    except RecursionError:
        raise RequestError(f"{what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge int literals
        raise RequestError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object, not {_json_type(value)}")
    return value


def decode_request(line: bytes | TooLong) -> tuple[str, dict[str, Any]]:
    """Return ``(command, arguments)`` of a request line.

    Raises:
        RequestError: the line is too long, not JSON, not an object, or has no
            string ``cmd``.
    """
    request = _decode_object(line, "request")
    cmd = request.pop("cmd", None)
    if not isinstance(cmd, str):
        raise RequestError('request needs "cmd", a string')
    return cmd, request


def decode_answer(line: bytes | TooLong) -> Any:
    """Return the result of an answer line.

    Raises:
        RequestError: the server answered with an error (its message), or the
            answer is malformed.
    """
    answer = _decode_object(line, "answer")
    if answer.get("ok") is True and "result" in answer:
        return answer["result"]
    if answer.get("ok") is False and isinstance(answer.get("error"), str):
        raise RequestError(answer["error"])
    raise RequestError(f"malformed answer: {line!r:.200}")


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _ok(result: Any) -> bytes:
    try:
        return encode({"ok": True, "result": result})
    except ValueError as exc:
        return _error(f"the answer cannot be encoded: {exc}")


def _error(text: str) -> bytes:
    return encode({"ok": False, "error": text})


# Arguments


def _int_arg(args: dict[str, Any], name: str, cmd: str) -> int:
    if name not in args:
        raise RequestError(f'{cmd} needs "{name}", a whole number')
    value = args[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f'{cmd}: "{name}" must be a whole number, not {_json_type(value)}')
    return value


def _check_args(args: dict[str, Any], cmd: str, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise RequestError(f"{cmd}: unknown argument(s) {', '.join(map(repr, unknown))}")


# The server

#: What a command gives back: the result, and what to do once it is answered.
Outcome = tuple[Any, Callable[[], None] | None]


class ControlServer:
    """Serves the control protocol for ``master`` on the Unix socket ``path``."""

    def __init__(self, master: Master, path: str) -> None:
        self.master = master
        self.path = path
        #: The last ``MESSAGES_KEPT`` worker messages, oldest first.
        self.messages: collections.deque[dict[str, Any]] = collections.deque(maxlen=MESSAGES_KEPT)
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._connections = 0
        self._commands: dict[str, Callable[[dict[str, Any]], Outcome]] = {
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
        self.master.message_handlers.append(self._on_worker_message)

    def close(self) -> None:
        """Stop listening and remove the socket file (if it is still ours); idempotent.

        Connections already open are left to finish their current request.
        """
        with contextlib.suppress(ValueError):
            self.master.message_handlers.remove(self._on_worker_message)
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
            writer.write(_error("permission denied: cannot read peer credentials"))
            return False
        if uid in (0, os.geteuid()):
            return True
        allowed = "root" if os.geteuid() == 0 else f"uid {os.geteuid()} and root"
        log.warning("control connection from uid %d (pid %d) refused: only %s may use it", uid, pid, allowed)
        writer.write(_error(f"permission denied: uid {uid} is not allowed"))
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
            return _error(str(exc)), None
        except Exception as exc:
            log.exception("control request failed")
            return _error(f"internal error: {type(exc).__name__}: {exc}"), None
        return _ok(result), then

    # Commands

    def _status(self, args: dict[str, Any]) -> Outcome:
        _check_args(args, "status", ())
        return self.master.snapshot(), None

    def _scale(self, args: dict[str, Any]) -> Outcome:
        _check_args(args, "scale", ("workers",))
        workers = _int_arg(args, "workers", "scale")
        if workers > MAX_WORKERS:
            raise RequestError(f"scale: at most {MAX_WORKERS} workers")
        try:
            added, removed = self.master.scale(workers)
        except ValueError as exc:
            raise RequestError(f"scale: {exc}") from None
        return {"added": added, "removed": removed, "workers": workers}, None

    def _stop(self, args: dict[str, Any]) -> Outcome:
        _check_args(args, "stop", ("graceful",))
        graceful = args.get("graceful", True)
        if not isinstance(graceful, bool):
            raise RequestError(f'stop: "graceful" must be a boolean, not {_json_type(graceful)}')
        log.info("stop requested on the control socket (%s)", "graceful" if graceful else "fast")

        def stop() -> None:
            self.master.request_stop(ExitCode.OK, graceful=graceful)

        return {"stopping": True}, stop

    def _message(self, args: dict[str, Any]) -> Outcome:
        _check_args(args, "message", ("payload", "worker"))
        if "payload" not in args:
            raise RequestError('message needs "payload"')
        worker = args.get("worker")
        if worker is not None:
            worker = _int_arg(args, "worker", "message")
        try:
            sent = self.master.send(worker, args["payload"])
        except ValueError as exc:
            raise RequestError(f"message: {exc}") from None
        return {"sent": sent}, None

    def _reload(self, args: dict[str, Any]) -> Outcome:
        _check_args(args, "reload", ())

        async def reload() -> dict[str, Any]:
            error = await self.master.reload()
            if error is not None:
                raise RequestError(f"reload failed: {error}")
            return {"reloaded": len(self.master.slots)}

        return reload(), None

    def _ready(self, args: dict[str, Any]) -> Outcome:
        _check_args(args, "ready", ("timeout",))
        timeout = args.get("timeout", READY_TIMEOUT_S)
        number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
        if not number or not 0 <= timeout <= MAX_READY_TIMEOUT_S:
            raise RequestError(
                f'ready: "timeout" must be a number of seconds from 0 to {MAX_READY_TIMEOUT_S:g}'
            )

        async def ready() -> dict[str, Any]:
            # Waits on the master's own events (a worker ready, a worker gone), not a poll.
            if not await self.master.wait_ready(float(timeout)):
                snapshot = self.master.snapshot()
                if snapshot["master"]["stopping"]:
                    raise RequestError("ready: the master is stopping")
                workers = snapshot["workers"]
                count = sum(1 for w in workers if w["state"] == "ready")
                raise RequestError(f"ready: {count} of {len(workers)} worker(s) ready after {timeout:g} s")
            return self.master.snapshot()

        return ready(), None

    def _messages(self, args: dict[str, Any]) -> Outcome:
        _check_args(args, "messages", ())
        return list(self.messages), None

    def _on_worker_message(self, worker_id: int, payload: Any) -> None:
        self.messages.append({"worker": worker_id, "payload": payload})
