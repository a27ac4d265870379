"""Which user and group workers run as (``--user``, ``--group``).

The master resolves names once, at start, so a typo is a usage error and
not a crash loop. It keeps its own identity: it binds first (privileged
ports) and owns the control socket. Each worker drops to the ids given on
its command line before it loads the app (``worker.process.drop_privileges``).
"""

from __future__ import annotations

import grp
import os
import pwd


def resolve(user: str | None, group: str | None) -> tuple[int | None, int | None]:
    """Return (uid, gid) for ``--user`` and ``--group``; None where not asked.

    A user without a group means the user's primary group.

    Raises:
        ValueError: an unknown name or id, or dropping privileges while not root.
    """
    uid = gid = None
    if user is not None:
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except (KeyError, OverflowError):
            raise ValueError(f"--user: no user {user!r}") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    if group is not None:
        try:
            gid = (grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)).gr_gid
        except (KeyError, OverflowError):
            raise ValueError(f"--group: no group {group!r}") from None
    changes = (uid is not None and uid != os.geteuid()) or (gid is not None and gid != os.getegid())
    if changes and os.geteuid() != 0:
        raise ValueError("--user/--group: only root can run workers as another user")
    return uid, gid
