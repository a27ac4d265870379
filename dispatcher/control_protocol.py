"""The control socket's protocol, sans-IO: JSON lines, one request and one answer each.

::

    {"cmd": "scale", "workers": 4}
    {"ok": true, "result": {"added": 2, "removed": 0, "workers": 4}}

``LineReader`` splits a byte stream into lines of bounded length,
``encode`` and the ``decode_*`` functions turn lines into values and back.
Nothing here touches a socket: the master's server (``dispatcher.control``,
asyncio) and the operator's client (``dispatcher.ctl``, blocking) each do
their own I/O with the same framing. Every malformed line raises
``RequestError`` with the message to show, whatever its bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

#: The longest request line accepted, newline excluded.
MAX_REQUEST_BYTES: Final = 64 * 1024
#: The longest answer line a client accepts (a snapshot of many workers).
MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024


class RequestError(Exception):
    """A request the server cannot carry out, or an error answer; the message says why."""


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
        raise RequestError(f"{what} must be a JSON object, not {json_type(value)}")
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


def json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def ok_answer(result: Any) -> bytes:
    """The answer line carrying ``result`` (an error answer if it cannot be encoded)."""
    try:
        return encode({"ok": True, "result": result})
    except ValueError as exc:
        return error_answer(f"the answer cannot be encoded: {exc}")


def error_answer(text: str) -> bytes:
    """The answer line saying the request failed, and why."""
    return encode({"ok": False, "error": text})
