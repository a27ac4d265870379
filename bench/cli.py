"""What the benchmark entry points (``bench.lab``, ``bench.peers``) share on the command line.

``choices``: the argument type of a comma-separated list of known names;
``interrupting_signals``: TERM, HUP and INT unwind like Ctrl-C while a run
goes on, so that the current run's servers are stopped too.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
from collections.abc import Iterator, Sequence
from types import FrameType

#: The signals that end a run as Ctrl-C does. INT is set explicitly as well: a shell starts
#: background jobs with INT ignored.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def choices(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """The comma-separated names in ``text``, each one of ``allowed``; ``what`` names the option."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if not items or unknown:
        raise argparse.ArgumentTypeError(
            f"{what}: unknown {', '.join(unknown) or '(empty)'}; choose from {','.join(allowed)}"
        )
    return items


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def interrupting_signals() -> Iterator[None]:
    """Within: ``STOP_SIGNALS`` raise KeyboardInterrupt; after: the handlers from before."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
