"""What a worker process does about itself: die with its master, say who it is.

python-prctl is optional (GPL-3.0, built from source). Without it the worker
cannot ask the kernel for a death signal or set its title, and relies on EOF
on its channel alone to notice that the master is gone.
"""

from __future__ import annotations

import logging
import os
import signal

from shared.prctl_extra import prctl_module

log = logging.getLogger(__name__)


def bind_to_master(master_pid: int) -> bool:
    """Ask for SIGKILL when the master dies; return False if it is already gone.

    The death signal is checked against ``getppid()`` afterwards: a master
    that died between our fork and the ``prctl`` call would otherwise leave us
    orphaned with no signal coming.
    """
    prctl = prctl_module()
    if prctl is not None:
        prctl.set_pdeathsig(signal.SIGKILL)
    return os.getppid() == master_pid


def set_title(title: str) -> bool:
    """Set the process title shown by ps and top; return whether it could be."""
    prctl = prctl_module()
    if prctl is None:
        return False
    prctl.set_proctitle(title)
    # The kernel's comm name (top, /proc/PID/comm) holds 15 bytes.
    prctl.set_name(title.removeprefix("dispatcher: ")[:15])
    return True


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """Become ``uid``/``gid`` for good (group first: after setuid it is not allowed).

    Supplementary groups are cleared, so nothing of root's stays. Done before
    the death signal is asked for: the kernel clears it when ids change.

    Raises:
        OSError: the kernel refused (not root).
    """
    if gid is not None:
        os.setgroups([])
        os.setgid(gid)
    if uid is not None:
        if gid is None:
            os.setgroups([])
        os.setuid(uid)
