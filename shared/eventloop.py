"""Choosing the asyncio event loop implementation, the same way on both sides.

uvloop (libuv) cuts the per-wake-up cost of the loop several times over,
which is most of the master's work per connection; it is used when
installed unless asyncio's own loop is asked for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CHOICES = ("auto", "asyncio", "uvloop")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """Return a factory for the loop ``name`` (``auto``: uvloop if installed).

    Raises:
        ValueError: ``name`` is unknown, or ``uvloop`` was asked for and is missing.
    """
    if name not in CHOICES:
        raise ValueError(f"unknown event loop {name!r}; choose from {', '.join(CHOICES)}")
    if name != "asyncio":
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":
                raise ValueError("--loop uvloop: uvloop is not installed") from None
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop


def resolve(name: str) -> str:
    """Return which loop ``name`` stands for here: ``asyncio`` or ``uvloop``."""
    return "asyncio" if loop_factory(name) is asyncio.new_event_loop else "uvloop"


def run(main: Coroutine[Any, Any, T], name: str) -> T:
    """``asyncio.run(main)`` on the loop ``name``."""
    with asyncio.Runner(loop_factory=loop_factory(name)) as runner:
        return runner.run(main)
