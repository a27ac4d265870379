"""Fixtures. Helpers live in ``tests.helpers``; the server harness and load client in ``bench``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from bench.server import Server


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh event loop, not running: the test runs it (the metrics tests have one on a thread)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def loop_on_a_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh event loop running on a thread of its own, stopped and closed after the test."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    assert not thread.is_alive()
    loop.close()


@pytest.fixture
def server_factory() -> Iterator[type[Server]]:
    """``Server``, but every server made through it is killed, with all its workers, after the test."""
    servers: list[Server] = []

    class Tracked(Server):
        def __init__(self, *args: str, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            servers.append(self)

    yield Tracked
    for server in servers:
        server.kill()
