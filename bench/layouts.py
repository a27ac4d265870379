"""The CPU layouts of the lab and the server comparison: where the server and the load generator run.

- ``pinned``: every process of the server (master and workers; started
  under ``taskset -c SERVER_CPU``, so everything it forks inherits it) on
  one CPU, the load generator (wrk under ``taskset -c CLIENT_CPU``) on the
  other: the server has one CPU, and the client does not compete with it.
- ``unpinned``: the kernel places everything on both CPUs.

``pinned`` needs both CPUs in this process's affinity (``pinning_possible``).
"""

from __future__ import annotations

import os

LAYOUTS = ("pinned", "unpinned")
#: The pinned layout's CPUs: the server's processes on one, the load generator on the other.
SERVER_CPU = 1
CLIENT_CPU = 0


def pinning_possible() -> bool:
    """Both CPUs of the pinned layout are ours to use."""
    return {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0)


def taskset(cpu: int | None) -> list[str]:
    """The prefix that runs a command on ``cpu`` (``taskset -c CPU``); empty for None."""
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def server_cpu(layout: str) -> int | None:
    """The CPU the server runs on in ``layout`` (None: wherever the kernel puts it)."""
    return SERVER_CPU if layout == "pinned" else None


def client_cpu(layout: str) -> int | None:
    """The CPU the load generator runs on in ``layout`` (None: wherever the kernel puts it)."""
    return CLIENT_CPU if layout == "pinned" else None
