"""A sans-IO parser of the PROXY protocol header, versions 1 (text) and 2 (binary).

HAProxy's specification (``doc/proxy-protocol.txt``). ``parse(data)`` looks at
the first bytes of a connection and says one of three things:

- ``NeedMore(up_to)``: ``data`` is the start of a header that may still be
  valid; at most ``up_to`` bytes in all make it complete (v1: the 107-byte
  line limit; v2: 16 until the length is known, then 16 + length). No header
  ends within ``data``: every byte of it belongs to the header.
- a ``Header``: a complete, valid header of ``length`` bytes starts
  ``data``; what follows it is the connection's own data, never looked at.
- ``InvalidHeader`` (raised): no valid header can start with ``data``.

The answer for a prefix never contradicts the answer for the whole: feeding
a header byte by byte gives the same ``Header`` (or the same failure) as
feeding it at once, which is what lets a caller consume the bytes of a
``NeedMore`` as it goes.

What is read: v1 ``TCP4``, ``TCP6`` and ``UNKNOWN``; v2 ``PROXY`` and
``LOCAL`` commands, families ``AF_INET``, ``AF_INET6``, ``AF_UNIX`` and
``UNSPEC``. TLVs are skipped, each one's length checked against the block.
A ``LOCAL`` header's block is skipped unread, as the specification asks.
``LOCAL``, ``UNSPEC`` and ``UNKNOWN`` carry no address to use (``source`` is
None): the connection's own is the one that counts.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

#: The longest v1 header, CRLF included.
V1_MAX = 107
#: A v2 header's fixed part (signature, version and command, family, length).
V2_FIXED = 16
#: The longest v2 header.
V2_MAX = V2_FIXED + 0xFFFF
V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

#: An address as ``socket.getpeername()`` gives it: (host, port) for IPv4,
#: (host, port, flowinfo, scope_id) for IPv6, a path for a Unix socket.
Address = tuple[str, int] | tuple[str, int, int, int] | str

_V2_ADDRESS_SIZES = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}  # UNSPEC, INET, INET6, UNIX
_V1_ALLOWED = frozenset(b"0123456789abcdefABCDEF.: PROXYTCPUNKNOWN46")


class InvalidHeader(ValueError):
    """No valid PROXY protocol header starts with these bytes; ``str()`` says why."""


@dataclass(frozen=True)
class NeedMore:
    """The bytes so far may start a valid header; it is complete within ``up_to`` bytes in all."""

    up_to: int


@dataclass(frozen=True)
class Header:
    """A complete PROXY protocol header."""

    version: int
    #: Its length in bytes: the connection's own data starts right after.
    length: int
    #: The client as the proxy saw it; None: LOCAL, UNSPEC or UNKNOWN (use the connection's own).
    source: Address | None = None
    #: The address the client connected to, on the proxy; None as for ``source``.
    destination: Address | None = None


def parse(data: bytes | bytearray | memoryview) -> Header | NeedMore:
    """What the start of a connection, ``data``, says (see the module docstring).

    Raises:
        InvalidHeader: no valid header starts with ``data``.
    """
    data = bytes(data[:V2_MAX])
    if data[:1] == V1_SIGNATURE[:1]:
        return _parse_v1(data)
    if data[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(data)
    if not data:
        return NeedMore(V1_MAX)
    raise InvalidHeader("no PROXY protocol signature")


def _parse_v1(data: bytes) -> Header | NeedMore:
    head = data[:len(V1_SIGNATURE)]
    if head != V1_SIGNATURE[:len(head)]:
        raise InvalidHeader("no PROXY protocol signature")
    end = data.find(b"\r\n", 0, V1_MAX)
    line = data[:V1_MAX] if end < 0 else data[:end]
    # Checked on what has come so far, so that a prefix fails as the whole would. A CR last may be
    # the first half of the CRLF; after UNKNOWN, anything goes.
    seen = line[:-1] if end < 0 and line.endswith(b"\r") else line
    if not seen.startswith(V1_SIGNATURE + b"UNKNOWN"):
        bad = next((byte for byte in seen if byte not in _V1_ALLOWED), None)
        if bad is not None:
            raise InvalidHeader(f"v1: byte {bad:#04x} in the header line")
    if end < 0:
        if len(data) >= V1_MAX:
            raise InvalidHeader(f"v1: no CRLF within {V1_MAX} bytes")
        return NeedMore(V1_MAX)
    length = end + 2
    fields = line[len(V1_SIGNATURE):].split(b" ")
    if fields[0] == b"UNKNOWN":
        return Header(1, length)  # the rest of the line is to be ignored
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise InvalidHeader("v1: expected TCP4, TCP6 or UNKNOWN and four fields")
    family, src, dst, sport, dport = fields
    try:
        version = ipaddress.IPv4Address if family == b"TCP4" else ipaddress.IPv6Address
        src_ip, dst_ip = version(src.decode()), version(dst.decode())
    except ValueError as exc:
        raise InvalidHeader(f"v1: {exc}") from None
    src_port, dst_port = _v1_port(sport), _v1_port(dport)
    if family == b"TCP4":
        return Header(1, length, (str(src_ip), src_port), (str(dst_ip), dst_port))
    return Header(1, length, (str(src_ip), src_port, 0, 0), (str(dst_ip), dst_port, 0, 0))


def _v1_port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0") or int(text) > 0xFFFF:
        raise InvalidHeader(f"v1: bad port {text[:8]!r}")
    return int(text)


def _parse_v2(data: bytes) -> Header | NeedMore:
    head = data[:len(V2_SIGNATURE)]
    if head != V2_SIGNATURE[:len(head)]:
        raise InvalidHeader("no PROXY protocol signature")
    if len(data) > 12:
        version, command = data[12] >> 4, data[12] & 0xF
        if version != 2:
            raise InvalidHeader(f"v2: version {version}")
        if command not in (0x0, 0x1):
            raise InvalidHeader(f"v2: command {command:#x}")
    if len(data) > 13:
        family, transport = data[13] >> 4, data[13] & 0xF
        if family not in _V2_ADDRESS_SIZES:
            raise InvalidHeader(f"v2: address family {family:#x}")
        if transport not in (0x0, 0x1, 0x2):
            raise InvalidHeader(f"v2: transport protocol {transport:#x}")
    if len(data) < V2_FIXED:
        return NeedMore(V2_FIXED)
    local = data[12] & 0xF == 0x0
    family = data[13] >> 4
    (block_length,) = struct.unpack_from("!H", data, 14)
    address_size = _V2_ADDRESS_SIZES[family]
    if block_length < address_size and not local:
        raise InvalidHeader(f"v2: {block_length} bytes of addresses, {address_size} needed")
    length = V2_FIXED + block_length
    if len(data) < length:
        return NeedMore(length)
    block = data[V2_FIXED:length]
    if local:
        return Header(2, length)  # its block is to be ignored, whatever it holds
    _check_tlvs(block[address_size:])
    if family == 0x0:
        return Header(2, length)
    source: Address
    destination: Address
    if family == 0x1:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", block)
        source = (str(ipaddress.IPv4Address(src)), sport)
        destination = (str(ipaddress.IPv4Address(dst)), dport)
    elif family == 0x2:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", block)
        source = (str(ipaddress.IPv6Address(src)), sport, 0, 0)
        destination = (str(ipaddress.IPv6Address(dst)), dport, 0, 0)
    else:
        src, dst = struct.unpack_from("!108s108s", block)
        source = src.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
        destination = dst.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
    return Header(2, length, source, destination)


def _check_tlvs(tlvs: bytes) -> None:
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < 3:
            raise InvalidHeader("v2: a TLV cut short")
        (value_length,) = struct.unpack_from("!H", tlvs, offset + 1)
        offset += 3 + value_length
        if offset > len(tlvs):
            raise InvalidHeader("v2: a TLV longer than the header")
