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
conn_ids = st.lists(u32, min_size=1, max_size=protocol.MAX_FDS).map(tuple)
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
    st.builds(Handoff, conn_ids),
    st.builds(Ack, conn_ids, st.booleans(), u32),
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


@given(conn_ids, st.booleans(), u32)
def test_fast_paths_agree_with_decode(ids: tuple[int, ...], accepted: bool, load: int) -> None:
    raw = protocol.encode_ack(ids, accepted, load)
    assert protocol.decode_ack(raw) == (ids, accepted, load)
    assert protocol.decode(raw) == Ack(ids, accepted, load)
    raw = protocol.encode_handoff(list(ids))
    assert raw == protocol.encode(Handoff(ids))
    assert protocol.decode_handoff(raw) == ids
    assert protocol.decode(raw) == Handoff(ids)


@given(st.binary(max_size=40))
def test_fast_paths_never_accept_what_decode_rejects(data: bytes) -> None:
    if protocol.decode_ack(data) is not None:
        assert isinstance(protocol.decode(data), Ack)
    if protocol.decode_handoff(data) is not None:
        assert isinstance(protocol.decode(data), Handoff)


def test_fds_expected() -> None:
    assert protocol.fds_expected(Handoff((1,))) == 1
    assert protocol.fds_expected(Handoff((1, 2, 3))) == 3
    assert protocol.fds_expected(Listen()) == 1
    assert protocol.fds_expected(Ack((1, 2), True)) == 0
    assert protocol.fds_expected(Ping(1)) == 0


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\xff", "unknown message type"),
        (bytes([protocol.MessageType.ACK]) + b"\x02" + b"\0" * 8, "0 or 1"),
        (bytes([protocol.MessageType.ACK, 1]), "1 to 64 ids"),
        (bytes([protocol.MessageType.ACK, 1]) + b"\0" * 4, "1 to 64 ids"),
        (bytes([protocol.MessageType.ACK, 1]) + b"\0" * 9, "1 to 64 ids"),
        (bytes([protocol.MessageType.HANDOFF]), "1 to 64 ids"),
        (bytes([protocol.MessageType.HANDOFF]) + b"\0" * 3, "1 to 64 ids"),
        (bytes([protocol.MessageType.HANDOFF]) + b"\0" * 4 * 65, "1 to 64 ids"),
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
        protocol.encode(Handoff((-1,)))
    with pytest.raises(ValueError):
        protocol.encode(Handoff((2**32,)))
    with pytest.raises(ValueError):
        protocol.encode(Handoff(()))
    with pytest.raises(ValueError):
        protocol.encode_handoff(list(range(protocol.MAX_FDS + 1)))
    with pytest.raises(ValueError):
        protocol.encode_ack((), True)
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
