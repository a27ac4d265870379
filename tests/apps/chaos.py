"""The fault suite's apps. Each answers a line with ``<worker id> <pid>`` (``ANSWER``), unless told otherwise.

- ``handler``: ``hang`` answers ``hanging <pid>`` and then blocks the event
  loop for good (a bug the ping timeout must catch; the client learns when
  the loop is blocked), ``sleep S`` waits S seconds without blocking it;
  anything else is answered at once. A client that hangs up before its
  line gets the answer written to a closed socket, which is harmless.
- ``lowfd:handler`` (``tests.apps.lowfd``) is the same with a low fd limit.
"""

from __future__ import annotations

import asyncio
import os
import time

import worker

#: What a client of these apps reads back: the worker id and its pid.
ANSWER = r"\d+ \d+\n"
#: How long ``hang`` blocks: longer than any scenario lasts.
HANG_S = 3600.0


async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    words = (await reader.readline()).decode(errors="replace").split()
    if words == ["hang"]:
        # Written at once (the transport's buffer is empty), with no await: nothing else runs
        # on this loop from here on.
        writer.write(f"hanging {os.getpid()}\n".encode())
        time.sleep(HANG_S)
    elif len(words) == 2 and words[0] == "sleep":
        await asyncio.sleep(float(words[1]))
    writer.write(f"{worker.current().id} {os.getpid()}\n".encode())
    await writer.drain()
