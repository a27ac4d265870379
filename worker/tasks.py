"""The futures a worker runs for its connections: how many are open, how many finished, when none are left."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class Tasks:
    """The futures running connections' handlers: how many are open, how many finished, when none are left."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_error: Callable[[BaseException], None]) -> None:
        self._open: set[asyncio.Future[Any]] = set()
        self.finished = 0
        self._on_error = on_error
        self._empty = asyncio.Event()
        self._empty.set()
        self._loop = loop

    def __len__(self) -> int:
        return len(self._open)

    def add(self, future: asyncio.Future[Any]) -> None:
        self._open.add(future)
        self._empty.clear()
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[Any]) -> None:
        self._open.discard(future)
        self.finished += 1
        if not future.cancelled() and future.exception() is not None:
            self._on_error(future.exception())  # type: ignore[arg-type]
        if not self._open:
            self._empty.set()

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def cancel_all(self) -> None:
        for future in list(self._open):
            future.cancel()
