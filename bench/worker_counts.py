"""Answers per worker, from the ``x-worker`` header every answer of the comparison's apps carries.

wrk counts in Lua (``LUA``, given to wrk with ``-s``): each thread counts the
header's values in ``response()``, and ``done()`` prints one line per
thread and value, ``x-worker PID N``. Lua runs inside wrk's threads, on
every answer, so the count is exact at any rate wrk reaches (a sampling
client would not be); defining ``response()`` costs wrk a header table per
answer, the same for every server. ``parse`` adds the threads' lines up.

``spread`` turns the counts into the figures of a cell: every worker the
server has, those that served nothing too (a worker that got no
connection is the unfairness Jain's index is there to show), Jain's index,
and the busiest worker's share.
"""

from __future__ import annotations

import collections
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bench.peer_probe import WORKER_HEADER
from bench.stats import jain_index, ranked_shares

LUA = f"""\
-- Counts answers per value of the {WORKER_HEADER} header, per thread; done() prints them.
local threads = {{}}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  counts = {{}}
end

function response(status, headers, body)
  local who = headers["{WORKER_HEADER}"]
  if who == nil then
    for name, value in pairs(headers) do
      if string.lower(name) == "{WORKER_HEADER}" then who = value end
    end
  end
  if who ~= nil then counts[who] = (counts[who] or 0) + 1 end
end

function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    for who, n in pairs(thread:get("counts")) do
      io.write(string.format("{WORKER_HEADER} %s %d\\n", who, n))
    end
  end
end
"""

_LINE = re.compile(rf"^{WORKER_HEADER} (\d+) (\d+)$", re.MULTILINE)
_HEADER = re.compile(rf"^{WORKER_HEADER}:\s*(\d+)\s*$", re.MULTILINE | re.IGNORECASE)


def write_script(directory: str | None = None) -> str:
    """Write ``LUA`` to a file (in ``directory``, else the temporary one); return its path."""
    fd, path = tempfile.mkstemp(prefix="worker-counts-", suffix=".lua", dir=directory)
    with os.fdopen(fd, "w") as out:
        out.write(LUA)
    return path


def parse(output: str) -> dict[int, int]:
    """The answers per worker pid in wrk's output with ``LUA`` (every thread's lines added up)."""
    counts: collections.Counter[int] = collections.Counter()
    for pid, n in _LINE.findall(output):
        counts[int(pid)] += int(n)
    return dict(sorted(counts.items()))


def header_worker(answer: str) -> int | None:
    """The pid in a raw HTTP answer's ``x-worker`` header, or None."""
    head = answer.split("\r\n\r\n", 1)[0].replace("\r\n", "\n")
    match = _HEADER.search(head)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Spread:
    """How a cell's answers were spread over the server's workers."""

    #: Answers per worker pid, every worker of the server included (0 for one that served none).
    counts: dict[int, int]
    #: Answers that named a pid not among the workers (a worker that replaced one mid-run).
    strangers: int

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def jain(self) -> float:
        return jain_index(list(self.counts.values()))

    @property
    def shares(self) -> list[float]:
        """Each worker's share, busiest first."""
        return ranked_shares(self.counts.values())

    @property
    def busiest_share(self) -> float:
        return self.shares[0] if self.shares else float("nan")


def spread(counted: Mapping[int, int], workers: Iterable[int]) -> Spread:
    """``counted`` (answers per pid) over ``workers`` (the server's worker pids)."""
    pids = set(workers)
    counts = {pid: counted.get(pid, 0) for pid in sorted(pids)}
    return Spread(counts, sum(n for pid, n in counted.items() if pid not in pids))
