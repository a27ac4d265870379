"""A custom server that echoes every message from the master back to it.

``worker.current()`` exists only once the worker runs, so the message handler
is registered when ``serve`` starts, not at import. Connections are served as
by ``tests.apps.handlers.serve``.
"""

from __future__ import annotations

from typing import Any

import worker
from tests.apps import handlers


async def serve(me: worker.Worker) -> None:
    """Echo messages as ``{"echo": payload, "worker": id}``."""

    def echo(payload: Any) -> None:
        me.send({"echo": payload, "worker": me.id})

    me.on_message(echo)
    await handlers.serve(me)
