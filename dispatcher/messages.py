"""User messages between the master and its workers (Node's ``worker.send`` and ``'message'``).

JSON-serialisable payloads ride the same channel as the hand-offs, queued
behind them (``Channel.send``), never in their way. From a worker, a payload
goes to every handler in ``handlers`` with the worker's id; a handler that
raises is logged and the others still run. To workers, a payload is queued
on each channel unless that worker has left ``MAX_BACKLOG`` messages unread
(it is not reading: more would only grow the master's memory).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from dispatcher.worker_process import WorkerProcess
from shared.protocol import UserMessage

log = logging.getLogger(__name__)

#: Messages queued for one worker beyond which more are dropped.
MAX_BACKLOG = 1000

#: Called with (worker id, payload) for each message a worker sends.
MessageHandler = Callable[[int, Any], None]


class Mailbox:
    """Where workers' messages go, and how the master's reach them."""

    def __init__(self) -> None:
        #: Called with (worker id, payload) for each message a worker sends.
        self.handlers: list[MessageHandler] = []

    def deliver(self, worker: WorkerProcess, payload: Any) -> None:
        """Give ``worker``'s message to every handler."""
        for handler in list(self.handlers):
            try:
                handler(worker.id, payload)
            except Exception:
                log.exception("message handler %r failed on a message from %r", handler, worker)

    @staticmethod
    def send(workers: Iterable[WorkerProcess], payload: Any) -> int:
        """Queue ``payload`` for each of ``workers``; return to how many it was sent.

        Raises:
            ValueError: ``payload`` is not JSON-serialisable or too large.
        """
        message = UserMessage(payload)
        sent = 0
        for worker in workers:
            if worker.channel.backlog >= MAX_BACKLOG:
                log.warning("%r has %d messages it has not read; dropping one more",
                            worker, worker.channel.backlog)
                continue
            worker.channel.send(message)
            sent += 1
        return sent
