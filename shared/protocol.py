"""The wire protocol between the master and its workers, sans-IO.

Theory of operation
-------------------
Each worker has one AF_UNIX SOCK_SEQPACKET socketpair with the master. One
datagram is one message, so there is no length prefix and no reassembly: the
first byte names the message type and the rest is its body, either a fixed
``struct`` layout (the hot messages: hand-off, ack, ping) or UTF-8 JSON (stats,
user messages, errors). File descriptors ride in the same datagram as
SCM_RIGHTS ancillary data; this module only says how many a message must
carry (``fds_expected``). It never touches a socket: the master and the
worker each do their own I/O (see ``shared.channel``).

Nothing here executes what it decodes (no pickle). Every malformed input
raises ``ProtocolError`` and nothing else, whatever the bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, Final

#: Changes with any change to the wire format. The master passes it to each
#: worker it starts, and a worker refuses to run under a master of another
#: version (after an upgrade on disk, a reload starts new-code workers under
#: the old master). 2: hand-offs and acks carry several connections.
VERSION: Final = 2

#: Largest datagram either side sends or accepts. JSON bodies beyond this are
#: refused at encode time; a larger datagram on the wire is a peer error.
MAX_MESSAGE_BYTES: Final = 64 * 1024

#: The most descriptors one message may carry: the connections of one
#: hand-off (the round-robin window is capped to match).
MAX_FDS: Final = 64


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow."""


class MessageType(IntEnum):
    HELLO = 1
    READY = 2
    HANDOFF = 3
    ACK = 4
    PING = 5
    PONG = 6
    DRAIN = 7
    ERROR = 8
    USER = 9
    LISTEN = 10


@dataclass(frozen=True, slots=True)
class Hello:
    """Worker to master, first thing after start: who it is."""

    TYPE: ClassVar[MessageType] = MessageType.HELLO
    worker_id: int
    pid: int


@dataclass(frozen=True, slots=True)
class Ready:
    """Worker to master: the app is loaded; send connections."""

    TYPE: ClassVar[MessageType] = MessageType.READY


@dataclass(frozen=True, slots=True)
class Handoff:
    """Master to worker: accepted connections to take, one fd per id, in order.

    One datagram carries the connections the master deals to this worker in
    one turn of its loop, up to ``dispatcher.scheduler.HANDOFF_FDS`` (more
    take several datagrams; the protocol allows at most ``MAX_FDS``).
    """

    TYPE: ClassVar[MessageType] = MessageType.HANDOFF
    conn_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    """Worker to master: connections taken (or refused while draining), by id.

    A serving worker acks each connection as its handler starts (one id); a
    draining one refuses a whole ``Handoff`` in one ack naming all its ids.
    Either way an ack may name several ids, with one verdict. The master
    checks that every id is one it handed to that worker and has not yet
    seen answered.
    """

    TYPE: ClassVar[MessageType] = MessageType.ACK
    conn_ids: tuple[int, ...]
    accepted: bool
    #: Connections the worker holds once it has taken these (its load, for the policy).
    load: int = 0


@dataclass(frozen=True, slots=True)
class Ping:
    """Master to worker: are you responsive?"""

    TYPE: ClassVar[MessageType] = MessageType.PING
    seq: int


@dataclass(frozen=True, slots=True)
class Pong:
    """Worker to master: answer to ``Ping`` ``seq``, with the worker's own counters."""

    TYPE: ClassVar[MessageType] = MessageType.PONG
    seq: int
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Drain:
    """Master to worker: refuse new hand-offs, finish open connections, exit."""

    TYPE: ClassVar[MessageType] = MessageType.DRAIN


@dataclass(frozen=True, slots=True)
class Error:
    """Either way: something went wrong that the other side should log."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class UserMessage:
    """Either way: an application's JSON-serialisable message."""

    TYPE: ClassVar[MessageType] = MessageType.USER
    payload: Any


@dataclass(frozen=True, slots=True)
class Listen:
    """Master to worker, with one fd: a listening socket to accept on itself."""

    TYPE: ClassVar[MessageType] = MessageType.LISTEN


Message = Hello | Ready | Handoff | Ack | Ping | Pong | Drain | Error | UserMessage | Listen

_HELLO = struct.Struct("!BII")
# Hand-off: type, then one uint32 id per fd. Ack: type, accepted flag, load
# (uint32), ids.
_ID_SIZE: Final = 4  # each id is a uint32, network order
_IDS: Final = tuple(struct.Struct(f"!{n}I") for n in range(MAX_FDS + 1))
_HANDOFF_HEAD = 1
_ACK_LOAD = struct.Struct("!I")
_ACK_HEAD = 2 + _ACK_LOAD.size
#: An ack's head (type, accepted flag, load) before its ids; the compiled hot path reads acks too.
ACK_HEAD: Final = _ACK_HEAD
_SEQ = struct.Struct("!BQ")
_ERROR = struct.Struct("!BH")
_TYPE_ONLY = struct.Struct("!B")


# Pre-encoded: these carry no fields, so every instance is the same bytes.
_READY_BYTES: Final = _TYPE_ONLY.pack(MessageType.READY)
_DRAIN_BYTES: Final = _TYPE_ONLY.pack(MessageType.DRAIN)
_LISTEN_BYTES: Final = _TYPE_ONLY.pack(MessageType.LISTEN)
_ACK_TYPE: Final = int(MessageType.ACK)
_HANDOFF_TYPE: Final = int(MessageType.HANDOFF)


def fds_expected(message: Message) -> int:
    """Return how many fds must arrive with ``message``."""
    if isinstance(message, Handoff):
        return len(message.conn_ids)
    return 1 if isinstance(message, Listen) else 0


def _dump_json(value: Any) -> bytes:
    try:
        body = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not JSON-serialisable: {exc}") from exc
    if len(body) + 9 > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return body


def encode(message: Message) -> bytes:
    """Return the datagram for ``message``.

    Raises:
        ValueError: a field does not fit (an id out of range, a JSON body that
            is not serialisable or too large). Nothing is sent in that case.
    """
    try:
        match message:
            case Handoff(conn_ids):
                return encode_handoff(conn_ids)
            case Ack(conn_ids, accepted, load):
                return encode_ack(conn_ids, accepted, load)
            case Ping(seq):
                return _SEQ.pack(MessageType.PING, seq)
            case Pong(seq, stats):
                return _SEQ.pack(MessageType.PONG, seq) + _dump_json(stats)
            case Hello(worker_id, pid):
                return _HELLO.pack(MessageType.HELLO, worker_id, pid)
            case Ready():
                return _READY_BYTES
            case Drain():
                return _DRAIN_BYTES
            case Listen():
                return _LISTEN_BYTES
            case Error(code, text):
                body = text.encode("utf-8", "replace")[: MAX_MESSAGE_BYTES - _ERROR.size]
                return _ERROR.pack(MessageType.ERROR, code) + body
            case UserMessage(payload):
                return _TYPE_ONLY.pack(MessageType.USER) + _dump_json(payload)
    except struct.error as exc:
        raise ValueError(f"cannot encode {message!r}: {exc}") from exc
    raise TypeError(f"not a protocol message: {message!r}")


def _pack_ids(head: bytes, conn_ids: Sequence[int]) -> bytes:
    if not 1 <= len(conn_ids) <= MAX_FDS:
        raise ValueError(f"{len(conn_ids)} connection ids: 1 to {MAX_FDS} per message")
    return head + _IDS[len(conn_ids)].pack(*conn_ids)


_HANDOFF_PREFIX: Final = bytes((MessageType.HANDOFF,))
_ACK_PREFIXES: Final = (bytes((MessageType.ACK, 0)), bytes((MessageType.ACK, 1)))


def encode_handoff(conn_ids: Sequence[int]) -> bytes:
    """``encode(Handoff(conn_ids))`` without building the message object (hot path).

    Raises:
        ValueError: no ids, more than ``MAX_FDS``, or an id outside 0..2**32-1.
    """
    try:
        return _pack_ids(_HANDOFF_PREFIX, conn_ids)
    except struct.error as exc:
        raise ValueError(f"cannot encode hand-off {conn_ids!r}: {exc}") from exc


def encode_ack(conn_ids: tuple[int, ...] | list[int], accepted: bool, load: int = 0) -> bytes:
    """``encode(Ack(conn_ids, accepted, load))`` without building the message object.

    Raises:
        ValueError: as ``encode_handoff``, or a load outside 0..2**32-1.
    """
    try:
        return _pack_ids(_ACK_PREFIXES[accepted] + _ACK_LOAD.pack(load), conn_ids)
    except struct.error as exc:
        raise ValueError(f"cannot encode ack {conn_ids!r}: {exc}") from exc


def _ids_in(data: bytes | bytearray, head: int, size: int) -> tuple[int, ...] | None:
    count, rest = divmod(size - head, _ID_SIZE)
    if rest or not 0 < count <= MAX_FDS:
        return None
    ids: tuple[int, ...] = _IDS[count].unpack_from(data, head)
    return ids


def decode_ack(data: bytes | bytearray, size: int | None = None) -> tuple[tuple[int, ...], bool, int] | None:
    """Return ``(conn_ids, accepted, load)`` if ``data[:size]`` is a well-formed ack, else None.

    The master's hot path tries this before the general ``decode``; ``size``
    lets it pass its receive buffer without copying the datagram out.
    """
    if size is None:
        size = len(data)
    count, rest = divmod(size - _ACK_HEAD, _ID_SIZE)
    if not rest and 0 < count <= MAX_FDS and data[0] == _ACK_TYPE and data[1] <= 1:
        return _IDS[count].unpack_from(data, _ACK_HEAD), data[1] == 1, _ACK_LOAD.unpack_from(data, 2)[0]
    return None


def decode_handoff(data: bytes | bytearray, size: int | None = None) -> tuple[int, ...] | None:
    """Return the conn ids if ``data[:size]`` is a well-formed hand-off, else None.

    The worker's hot path, as ``decode_ack`` is the master's.
    """
    if size is None:
        size = len(data)
    if size > _HANDOFF_HEAD and data[0] == _HANDOFF_TYPE:
        return _ids_in(data, _HANDOFF_HEAD, size)
    return None


def _fixed(layout: struct.Struct, data: bytes, name: str) -> tuple[Any, ...]:
    if len(data) != layout.size:
        raise ProtocolError(f"{name}: expected {layout.size} bytes, got {len(data)}")
    return layout.unpack(data)


def _load_json(body: bytes, name: str) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{name}: body is not valid JSON") from exc


def decode(data: bytes) -> Message:
    """Return the message in one datagram.

    Raises:
        ProtocolError: ``data`` is not exactly one well-formed message. This is
            the only exception it raises, whatever ``data`` holds.
    """
    if not data:
        raise ProtocolError("empty message")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    kind = data[0]
    if kind == MessageType.ACK:
        if len(data) > 1 and data[1] > 1:
            raise ProtocolError("ack: accepted flag must be 0 or 1")
        ack = decode_ack(data)
        if ack is None:
            raise ProtocolError(f"ack: needs a flag, a load and 1 to {MAX_FDS} ids of {_ID_SIZE} bytes")
        return Ack(*ack)
    if kind == MessageType.HANDOFF:
        ids = decode_handoff(data)
        if ids is None:
            raise ProtocolError(f"handoff: needs 1 to {MAX_FDS} ids of {_ID_SIZE} bytes")
        return Handoff(ids)
    if kind == MessageType.PING:
        return Ping(_fixed(_SEQ, data, "ping")[1])
    if kind == MessageType.PONG:
        if len(data) < _SEQ.size:
            raise ProtocolError("pong: too short")
        (_, seq) = _SEQ.unpack_from(data)
        stats = _load_json(data[_SEQ.size :], "pong")
        if not isinstance(stats, dict):
            raise ProtocolError("pong: stats must be a JSON object")
        return Pong(seq, stats)
    if kind == MessageType.HELLO:
        _, worker_id, pid = _fixed(_HELLO, data, "hello")
        return Hello(worker_id, pid)
    if kind == MessageType.READY:
        _fixed(_TYPE_ONLY, data, "ready")
        return Ready()
    if kind == MessageType.DRAIN:
        _fixed(_TYPE_ONLY, data, "drain")
        return Drain()
    if kind == MessageType.LISTEN:
        _fixed(_TYPE_ONLY, data, "listen")
        return Listen()
    if kind == MessageType.ERROR:
        if len(data) < _ERROR.size:
            raise ProtocolError("error: too short")
        (_, code) = _ERROR.unpack_from(data)
        return Error(code, data[_ERROR.size :].decode("utf-8", "replace"))
    if kind == MessageType.USER:
        return UserMessage(_load_json(data[1:], "user message"))
    raise ProtocolError(f"unknown message type {kind}")
