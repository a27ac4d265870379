"""Calling a function on the master's event loop from another thread, with a timeout.

The admin HTTP listener (``metrics``, ``probes``) answers on threads of its
own, but every figure it serves is master state, which only the loop thread
reads. ``call_on_loop`` schedules the function with ``call_soon_threadsafe``
and waits for its result on a ``concurrent.futures.Future``: it runs between
two loop callbacks, so what it reads is consistent, and a loop that is
blocked, busy or gone makes the caller give up after ``timeout_s`` instead
of hanging. A call that timed out is cancelled, so a loop that catches up
later skips it; nothing ever raises on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class LoopUnavailable(Exception):
    """The loop did not run the call: it is closed, or did not get to it in time. The message says which."""


def call_on_loop(loop: asyncio.AbstractEventLoop, function: Callable[[], T], timeout_s: float) -> T:
    """Return ``function()`` as run on ``loop``, waiting at most ``timeout_s``.

    Called on the loop's own thread, it runs ``function`` at once (waiting
    would deadlock).

    Raises:
        LoopUnavailable: the loop is closed, or did not run it within ``timeout_s``.
        Exception: whatever ``function`` raised.
    """
    if _running_loop() is loop:
        return function()
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    try:
        loop.call_soon_threadsafe(_fill, future, function)
    except RuntimeError:  # the loop is closed
        raise LoopUnavailable("the master's event loop is closed") from None
    done, _ = concurrent.futures.wait((future,), timeout_s)
    if not done:
        future.cancel()  # not started yet: the loop skips it; under way: its result goes nowhere
        raise LoopUnavailable(f"the master did not answer in {timeout_s:g} s")
    return future.result()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    # Not the thread id: a finished loop thread's id can be reused by an HTTP thread.
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _fill(future: concurrent.futures.Future[T], function: Callable[[], T]) -> None:
    """Run on the loop: put ``function()`` or its exception in ``future``, never raise."""
    if not future.set_running_or_notify_cancel():
        return  # the caller gave up already
    try:
        result = function()
    except Exception as exc:
        future.set_exception(exc)
    else:
        future.set_result(result)
