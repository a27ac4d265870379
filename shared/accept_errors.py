"""What an error from ``accept()`` means: out of a resource, or one client's failure.

The master accepts under round-robin and the workers accept under shared and
reuseport; both must answer an error the same way, or the policies would be
compared on how they recover rather than on how they spread connections.

- EMFILE, ENFILE, ENOBUFS, ENOMEM: the process or the system is out of a
  resource. The listener stays readable, so accepting again at once would
  spin: stop accepting for a moment. Logged per episode, not per retry
  (``OverloadEpisode``): one line when it begins, one summary once accepting
  has run clean for a while (how often it paused, for how long).
- Anything else concerns the one connection that failed and is gone
  (ECONNABORTED: the client reset it while it waited; EPROTO; EPERM from a
  firewall rule; the network errors Linux passes on from the new
  connection): skip it and accept the next.

- EBADF, ENOTSOCK, EINVAL: the listener itself is closed or not listening;
  every retry would fail the same way, so accepting on it stops.

EAGAIN and EINTR are not errors here: there is nothing more to accept now.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Final

from shared.episode import Episode

#: The errnos that mean out of a resource rather than one client's failure.
OVERLOAD_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


#: The errnos that mean the listener is unusable (closed, not a socket, not listening).
LISTENER_GONE_ERRNOS: Final = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EINVAL})


def is_listener_gone(exc: OSError) -> bool:
    """Return whether ``exc``, raised by ``accept()``, means the listener cannot be accepted on."""
    return exc.errno in LISTENER_GONE_ERRNOS


def is_overload(exc: OSError) -> bool:
    """Return whether ``exc``, raised by ``accept()``, means pause (True) rather than skip (False)."""
    return exc.errno in OVERLOAD_ERRNOS


#: An episode ends once no accept has failed for this long: a resource that
#: runs out again and again within it is one episode, not many.
CLEAN_S: Final = 5.0


class OverloadEpisode:
    """Logs an overload episode: one warning when accepts begin to fail, one summary once they stopped.

    Parameters:
        logger: where the lines go (the acceptor's, so they say who paused).
        loop: runs the timer that ends the episode.
        pause_s: how long each pause lasts (for the first line).
        clean_s: how long accepting must run clean for the episode to end.
    """

    def __init__(self, logger: logging.Logger, loop: asyncio.AbstractEventLoop, pause_s: float,
                 clean_s: float = CLEAN_S) -> None:
        self._log = logger
        self.pause_s = pause_s
        self._reason = ""
        # Quiet from the last failure: its pause, then clean accepting.
        self._episode = Episode(loop, clean_s + pause_s, self._began, self._ended)

    @property
    def clean_s(self) -> float:
        return self._episode.quiet_s - self.pause_s

    @clean_s.setter
    def clean_s(self, value: float) -> None:
        self._episode.quiet_s = value + self.pause_s

    @property
    def active(self) -> bool:
        return self._episode.active

    def paused(self, exc: OSError) -> None:
        """An accept failed with ``exc`` (an overload) and accepting pauses for ``pause_s``."""
        if not self._episode.active:
            self._reason = exc.strerror or str(exc)
        self._episode.happened()

    def _began(self) -> None:
        self._log.warning("accept failed: %s; pausing accepts for %.0f ms at a time until it passes",
                          self._reason, self.pause_s * 1000)

    def _ended(self, pauses: int, span_s: float) -> None:
        self._log.info("accepting ran clean for %g s: accepts paused %d time(s) over %.1f s (%s)",
                       self.clean_s, pauses, span_s + self.pause_s, self._reason)

    def close(self) -> None:
        """Stop the timer (the acceptor is closing); an episode under way ends unsummarised."""
        self._episode.close()
