"""The wire protocol: round trips, and garbage only ever raising ProtocolError."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import protocol
from shared.protocol import (
    Ack,
    Drain,
    Error,
    Handoff,
    Hello,
    Listen,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Ready,
    UserMessage,
)

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, u32, u32),
    st.just(Ready()),
    st.builds(Handoff, u64),
    st.builds(Ack, u64, st.booleans()),
    st.builds(Ping, u64),
    st.builds(Pong, u64, st.dictionaries(st.text(max_size=8), json_values, max_size=4)),
    st.just(Drain()),
    st.builds(Error, st.integers(0, 65535), st.text(max_size=50)),
    st.builds(UserMessage, json_values),
    st.just(Listen()),
)


@given(messages)
def test_every_message_round_trips(message: Message) -> None:
    assert protocol.decode(protocol.encode(message)) == message


@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_protocol_error(data: bytes) -> None:
    try:
        message = protocol.decode(data)
    except ProtocolError:
        return
    # Whatever decodes must encode back to something that decodes the same.
    assert protocol.decode(protocol.encode(message)) == message


@given(messages, st.data())
def test_truncated_or_extended_messages_raise_only_protocol_error(
    message: Message, data: st.DataObject
) -> None:
    raw = protocol.encode(message)
    cut = data.draw(st.integers(0, len(raw)))
    for mangled in (raw[:cut], raw + data.draw(st.binary(min_size=1, max_size=8))):
        with contextlib.suppress(ProtocolError):
            protocol.decode(mangled)


@given(u64, st.booleans())
def test_fast_ack_path_agrees_with_decode(conn_id: int, accepted: bool) -> None:
    raw = protocol.encode_ack(conn_id, accepted)
    assert protocol.decode_ack(raw) == (conn_id, accepted)
    assert protocol.decode(raw) == Ack(conn_id, accepted)
    assert protocol.encode_handoff(conn_id) == protocol.encode(Handoff(conn_id))


@given(st.binary(max_size=20))
def test_fast_ack_path_never_accepts_what_decode_rejects(data: bytes) -> None:
    if protocol.decode_ack(data) is not None:
        assert isinstance(protocol.decode(data), Ack)


def test_fds_expected() -> None:
    assert protocol.fds_expected(Handoff(1)) == 1
    assert protocol.fds_expected(Listen()) == 1
    assert protocol.fds_expected(Ack(1, True)) == 0
    assert protocol.fds_expected(Ping(1)) == 0


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\xff", "unknown message type"),
        (bytes([protocol.MessageType.ACK]) + b"\0" * 8 + b"\x02", "0 or 1"),
        (bytes([protocol.MessageType.HANDOFF]) + b"\0" * 3, "expected 9 bytes"),
        (bytes([protocol.MessageType.PONG]) + b"\0" * 8 + b"[1]", "JSON object"),
        (bytes([protocol.MessageType.USER]) + b"{", "not valid JSON"),
        (bytes([protocol.MessageType.USER]) + b"\xff\xfe", "not valid JSON"),
        (bytes([protocol.MessageType.USER]) + b"x" * protocol.MAX_MESSAGE_BYTES, "exceeds"),
    ],
)
def test_malformed_messages_say_why(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        protocol.decode(data)


def test_encode_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError):
        protocol.encode(Handoff(-1))
    with pytest.raises(ValueError):
        protocol.encode(UserMessage(object()))
    with pytest.raises(ValueError):
        protocol.encode(UserMessage("x" * protocol.MAX_MESSAGE_BYTES))
    with pytest.raises(ValueError):
        protocol.encode(UserMessage(float("nan")))


def test_deeply_nested_json_is_a_protocol_error() -> None:
    data = bytes([protocol.MessageType.USER]) + b"[" * 50000 + b"]" * 50000
    with pytest.raises(ProtocolError):
        protocol.decode(data[: protocol.MAX_MESSAGE_BYTES])
