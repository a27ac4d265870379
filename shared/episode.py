"""A burst of one event, logged twice: once when it begins, once summed up when it is over.

Under overload the same thing happens again and again (an accept fails,
a control connection is refused); one line each would drown the log. An
``Episode`` calls ``on_begin`` at the first occurrence and ``on_end`` with
the count and the span once ``quiet_s`` has passed without another (or when
told the burst is over). One timer per episode, pushed back while it goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Episode:
    """Counts occurrences of one event into episodes.

    Parameters:
        loop: runs the timer that ends the episode.
        quiet_s: an episode ends once this long passed with no occurrence.
        on_begin: called at the first occurrence of an episode.
        on_end: called with (occurrences, seconds from the first to the last) when it ends.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, quiet_s: float, on_begin: Callable[[], None],
                 on_end: Callable[[int, float], None]) -> None:
        self._loop = loop
        self.quiet_s = quiet_s
        self._on_begin = on_begin
        self._on_end = on_end
        self._started: float | None = None
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        #: Occurrences in the episode under way (0: none is).
        self.count = 0

    @property
    def active(self) -> bool:
        return self._started is not None

    def happened(self) -> None:
        """One more occurrence; the first begins an episode."""
        now = self._loop.time()
        self._last = now
        self.count += 1
        if self._started is None:
            self._started = now
            self._on_begin()
            self._timer = self._loop.call_later(self.quiet_s, self._check)

    def _check(self) -> None:
        quiet_for = self._loop.time() - self._last
        if quiet_for < self.quiet_s:
            self._timer = self._loop.call_later(self.quiet_s - quiet_for, self._check)
            return
        self._timer = None
        self.end()

    def end(self) -> None:
        """The episode under way, if any, is over: sum it up."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._started is not None:
            count, span = self.count, self._last - self._started
            self._started, self.count = None, 0
            self._on_end(count, span)

    def close(self) -> None:
        """Stop the timer; an episode under way ends unsummarised."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._started, self.count = None, 0
