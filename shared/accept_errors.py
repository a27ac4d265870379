"""What an error from ``accept()`` means: out of a resource, or one client's failure.

The master accepts under round-robin and the workers accept under shared and
reuseport; both must answer an error the same way, or the policies would be
compared on how they recover rather than on how they spread connections.

- EMFILE, ENFILE, ENOBUFS, ENOMEM: the process or the system is out of a
  resource. The listener stays readable, so accepting again at once would
  spin: stop accepting for a moment, and log once per episode, not per retry.
- Anything else concerns the one connection that failed and is gone
  (ECONNABORTED: the client reset it while it waited; EPROTO; EPERM from a
  firewall rule; the network errors Linux passes on from the new
  connection): skip it and accept the next.

EAGAIN and EINTR are not errors here: there is nothing more to accept now.
"""

from __future__ import annotations

import errno
from typing import Final

#: The errnos that mean out of a resource rather than one client's failure.
OVERLOAD_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def is_overload(exc: OSError) -> bool:
    """Return whether ``exc``, raised by ``accept()``, means pause (True) rather than skip (False)."""
    return exc.errno in OVERLOAD_ERRNOS
