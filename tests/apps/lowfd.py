"""``tests.apps.chaos:handler`` in a worker whose fd limit (soft and hard) is ``CHAOS_NOFILE`` (128).

The limit is lowered when the app is imported, so each worker, and not the
master, runs at it: a worker that holds that many connections cannot be
handed any more.
"""

from __future__ import annotations

import os
import resource

from tests.apps.chaos import handler

NOFILE = int(os.environ.get("CHAOS_NOFILE", "128"))
resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))

__all__ = ["NOFILE", "handler"]
