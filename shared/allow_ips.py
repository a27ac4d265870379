"""``--forwarded-allow-ips``: which peers are trusted to speak for their clients, in uvicorn's syntax.

A comma-separated list of addresses (``10.0.0.1``, ``::1``), networks
(``10.0.0.0/8``) or ``*`` (every peer); an entry that is neither is a
literal, matched against the peer's host as it is written (as uvicorn
does). Parsed once; asked with the peer address a socket gives
(``getpeername()``). An IPv4 client of a dual-stack socket
(``::ffff:10.0.0.1``) matches as its IPv4 address. A Unix-socket peer has no
address: only ``*`` trusts it.

uvicorn has its own parser for its proxy headers (``worker.uvicorn_adapter``
passes the same text to it); this one serves every interface, uvicorn or not.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any

#: When neither the option nor ``$FORWARDED_ALLOW_IPS`` says (uvicorn's default).
DEFAULT = "127.0.0.1,::1"

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AllowIps:
    """A parsed ``--forwarded-allow-ips``."""

    everyone: bool = False
    networks: tuple[_Network, ...] = ()
    literals: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, text: str | None) -> AllowIps:
        """``text`` as the option gives it; None: ``$FORWARDED_ALLOW_IPS``, else ``DEFAULT``."""
        if text is None:
            text = os.environ.get("FORWARDED_ALLOW_IPS", DEFAULT)
        everyone = False
        networks: list[_Network] = []
        literals: set[str] = set()
        for entry in (part.strip() for part in text.split(",")):
            if not entry:
                continue
            if entry == "*":
                everyone = True
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                literals.add(entry)
        return cls(everyone, tuple(networks), frozenset(literals))

    def allows(self, peer: Any) -> bool:
        """Whether ``peer`` (a ``getpeername()`` result, or None) is trusted."""
        if self.everyone:
            return True
        if not isinstance(peer, tuple) or not peer:
            return False
        host = str(peer[0])
        if host in self.literals:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address.version == network.version and address in network for network in self.networks)
