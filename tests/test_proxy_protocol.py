"""The PROXY protocol parser (``shared.proxy_protocol``) and the trusted peers (``shared.allow_ips``)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.allow_ips import AllowIps
from shared.proxy_protocol import V1_MAX, V2_SIGNATURE, Header, InvalidHeader, NeedMore, parse

ports = st.integers(0, 0xFFFF)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40))).map(
    lambda items: b"".join(struct.pack("!BH", kind, len(value)) + value for kind, value in items))


def v1(family: str, src: str, dst: str, sport: int, dport: int) -> bytes:
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(command: int, family: int, block: bytes, transport: int = 1) -> bytes:
    fixed = bytes([0x20 | command, family << 4 | transport]) + struct.pack("!H", len(block))
    return V2_SIGNATURE + fixed + block


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, Header]:
    """A valid header of any kind, and what it says."""
    kind = draw(st.sampled_from(["v1-tcp4", "v1-tcp6", "v1-unknown", "v2-inet", "v2-inet6", "v2-unix",
                                 "v2-unspec", "v2-local"]))
    sport, dport = draw(ports), draw(ports)
    if kind == "v1-tcp4":
        src, dst = draw(ipv4), draw(ipv4)
        data = v1("TCP4", src, dst, sport, dport)
        return data, Header(1, len(data), (src, sport), (dst, dport))
    if kind == "v1-tcp6":
        src, dst = draw(ipv6), draw(ipv6)
        data = v1("TCP6", src, dst, sport, dport)
        return data, Header(1, len(data), (src, sport, 0, 0), (dst, dport, 0, 0))
    if kind == "v1-unknown":
        rest = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40))
        data = f"PROXY UNKNOWN{' ' + rest if rest else ''}\r\n".encode()
        return data, Header(1, len(data))
    extra = draw(tlvs)
    if kind == "v2-inet":
        src, dst = draw(ipv4), draw(ipv4)
        block = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
        data = v2(1, 1, block + struct.pack("!HH", sport, dport) + extra)
        return data, Header(2, len(data), (src, sport), (dst, dport))
    if kind == "v2-inet6":
        src, dst = draw(ipv6), draw(ipv6)
        block = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
        data = v2(1, 2, block + struct.pack("!HH", sport, dport) + extra)
        return data, Header(2, len(data), (src, sport, 0, 0), (dst, dport, 0, 0))
    if kind == "v2-unix":
        path = "/run/" + draw(st.text("abc", max_size=20))
        data = v2(1, 3, path.encode().ljust(108, b"\0") + b"/srv".ljust(108, b"\0") + extra)
        return data, Header(2, len(data), path, "/srv")
    if kind == "v2-unspec":
        data = v2(1, 0, extra, transport=0)
        return data, Header(2, len(data))
    data = v2(0, draw(st.integers(0, 3)), draw(st.binary(max_size=20)), transport=0)  # LOCAL: ignored
    return data, Header(2, len(data))


def fed_byte_by_byte(data: bytes) -> Header | NeedMore | str:
    """The first answer other than NeedMore, feeding ``data`` one byte more at a time."""
    for end in range(len(data) + 1):
        try:
            result = parse(data[:end])
        except InvalidHeader:
            return "invalid"
        if isinstance(result, Header):
            return result
        assert result.up_to > end  # the header ends beyond what came
    return result


def at_once(data: bytes) -> Header | NeedMore | str:
    try:
        return parse(data)
    except InvalidHeader:
        return "invalid"


@given(headers(), st.binary(max_size=64))
def test_a_header_is_read_whole_and_never_past_its_end(case: tuple[bytes, Header], after: bytes) -> None:
    data, expected = case
    assert parse(data + after) == expected
    assert expected.length == len(data)


@given(headers(), st.binary(max_size=8))
def test_fed_byte_by_byte_it_says_what_it_says_at_once(case: tuple[bytes, Header], after: bytes) -> None:
    data, expected = case
    assert fed_byte_by_byte(data + after) == expected


@given(headers())
def test_a_truncated_header_needs_more(case: tuple[bytes, Header]) -> None:
    data, _ = case
    for end in range(len(data)):
        result = parse(data[:end])
        # What it asks for is more than it has, never more than the header (v1: its limit).
        assert isinstance(result, NeedMore) and end < result.up_to <= max(len(data), V1_MAX)


@given(st.binary(max_size=300))
def test_any_bytes_fed_byte_by_byte_give_the_same_answer_as_at_once(data: bytes) -> None:
    whole = at_once(data)
    assert fed_byte_by_byte(data) == whole


@given(headers(), st.data())
def test_a_corrupted_header_is_invalid_or_says_something_else_consistently(
    case: tuple[bytes, Header], draw: st.DataObject
) -> None:
    data, _ = case
    at = draw.draw(st.integers(0, len(data) - 1))
    corrupted = data[:at] + bytes([data[at] ^ draw.draw(st.integers(1, 255))]) + data[at + 1:]
    assert fed_byte_by_byte(corrupted) == at_once(corrupted)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF alone
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # a field short
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY TCP4 ::1 ::1 1 2\r\n",
    b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 " + b"1" * 120,  # no CRLF within 107 bytes
    V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\0" * 12,  # version 3
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\0" * 12,  # command 2
    V2_SIGNATURE + b"\x21\x41\x00\x0c" + b"\0" * 12,  # family 4
    V2_SIGNATURE + b"\x21\x13\x00\x0c" + b"\0" * 12,  # transport 3
    V2_SIGNATURE + b"\x21\x11\x00\x0b" + b"\0" * 11,  # addresses cut short
    V2_SIGNATURE + b"\x21\x11\x00\x0e" + b"\0" * 14,  # a TLV cut short
    V2_SIGNATURE + b"\x21\x11\x00\x10" + b"\0" * 12 + b"\x01\x00\x05\x00",  # a TLV too long
])
def test_garbage_is_invalid(data: bytes) -> None:
    with pytest.raises(InvalidHeader):
        parse(data)


def test_examples_from_the_specification() -> None:
    assert parse(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /") == Header(
        1, 47, ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert parse(b"PROXY UNKNOWN\r\n") == Header(1, 15)
    assert parse(b"") == NeedMore(V1_MAX)
    assert parse(V2_SIGNATURE[:5]) == NeedMore(16)
    assert parse(V2_SIGNATURE + b"\x21\x11\x00\x0c") == NeedMore(28)


def test_allow_ips_in_uvicorns_syntax(monkeypatch: pytest.MonkeyPatch) -> None:
    allow = AllowIps.parse("10.0.0.0/8, 192.168.1.7,::1,unix-peer")
    assert allow.allows(("10.1.2.3", 5)) and allow.allows(("192.168.1.7", 5))
    assert allow.allows(("::ffff:10.0.0.1", 5, 0, 0)) and allow.allows(("::1", 5, 0, 0))
    assert not allow.allows(("192.168.1.8", 5)) and not allow.allows(("11.0.0.1", 5))
    assert allow.allows(("unix-peer", 0)) and not allow.allows("") and not allow.allows(None)
    assert AllowIps.parse("*").allows("") and AllowIps.parse("*").allows(("8.8.8.8", 1))
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    assert AllowIps.parse(None).allows(("127.0.0.1", 1)) and not AllowIps.parse(None).allows(("10.0.0.1", 1))
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "10.0.0.1")
    assert AllowIps.parse(None).allows(("10.0.0.1", 1)) and not AllowIps.parse(None).allows(("127.0.0.1", 1))
