"""Named exit codes shared by the master and its workers.

A worker that can never boot must stop the master instead of being respawned
forever, so the reasons a process ends are part of the contract between them.
"""

from __future__ import annotations

import signal
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    #: Bad command line or configuration (argparse uses 2 as well).
    USAGE = 2
    #: A worker could not set itself up (channel, arguments, runtime).
    WORKER_BOOT_FAILED = 3
    #: The ``--app`` spec could not be imported or is not a usable handler.
    APP_LOAD_FAILED = 4
    #: The worker found its master gone.
    MASTER_GONE = 5


def describe(returncode: int) -> str:
    """Return a human description of a ``Popen.returncode``-style status."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    try:
        meaning = ExitCode(returncode).name.lower().replace("_", " ")
    except ValueError:
        return f"exited with code {returncode}"
    return f"exited with code {returncode} ({meaning})"
