"""Log set-up for both sides: every line says who wrote it.

Text lines read ``TIME [PID] [master] LEVEL message`` or ``[worker 3]``;
``json`` writes one object a line with the same fields, for log shippers.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error", "critical")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, role, worker id, pid, message."""

    def __init__(self, role: str, worker_id: int | None) -> None:
        super().__init__()
        self._role = role
        self._worker_id = worker_id

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "role": self._role,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if self._worker_id is not None:
            entry["worker"] = self._worker_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup(level: str, fmt: str, worker_id: int | None = None) -> None:
    """Send this process's logs to stderr, naming the master or ``worker N``."""
    role = "master" if worker_id is None else "worker"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role, worker_id))
    else:
        who = "master" if worker_id is None else f"worker {worker_id}"
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s [%(process)d] [{who}] %(levelname)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
