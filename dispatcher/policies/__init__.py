"""Scheduling policies, one module each, all of the shape in ``base``."""

from __future__ import annotations

from dispatcher.policies.base import Policy
from dispatcher.policies.reuseport import ReusePort
from dispatcher.policies.round_robin import RoundRobin
from dispatcher.policies.shared import SharedAccept

NAMES = (RoundRobin.name, SharedAccept.name, ReusePort.name)


def create(name: str, window: int = 1) -> Policy:
    """Return a new policy by its command-line name.

    Raises:
        ValueError: no policy has that name.
    """
    if name == RoundRobin.name:
        return RoundRobin(window)
    if name == SharedAccept.name:
        return SharedAccept()
    if name == ReusePort.name:
        return ReusePort()
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(NAMES)}")


__all__ = ["NAMES", "Policy", "ReusePort", "RoundRobin", "SharedAccept", "create"]
