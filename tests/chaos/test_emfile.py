"""EMFILE at accept: the master at its fd limit under a flood of connecting clients.

The master runs under ``prlimit --nofile=N:N``, and its workers inherit
the limit. Its fd budget would keep its accepts clear of EMFILE, so once
it is serving its own soft limit is lowered under it (``prlimit`` on the
running process) to a few fds above what it has open: the flood has more
clients than that, so accepts fail with EMFILE. It must pause accepting
(the kernel's backlog holds the clients), never spin or crash, measure its
budget again, answer ``ctl status`` meanwhile, and serve as before once
the flood ends. A worker that gets a hand-off bigger than its fd table has
room for refuses it and drains; its replacement needs fds of the master's.
Its log should say so a handful of times per episode, not once per pause.
"""

from __future__ import annotations

import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.flood import Flood
from bench.load import Load
from bench.server import Server
from tests.apps.chaos import ANSWER
from tests.chaos.support import (
    SPAWN_FAILED,
    WORKER_AT_LIMIT,
    Recorder,
    StatusProbe,
    Targets,
    count_lines,
    count_processes,
    full_and_short,
    seconds,
    served_within,
)

APP = "tests.apps.chaos:handler"
NOFILE = 128
#: The master's soft limit, lowered while it serves: this many fds above what it has open.
MASTER_ROOM = 12
CLIENTS = 300
#: A line of the master's about accept errors: when an episode begins, and its summary.
ACCEPT_LINE = re.compile(r"\[master\] \w+ (accept failed|accepting ran clean)")
#: How often ``ctl status`` is asked during a flood.
PROBE_EVERY_S = 0.25


@dataclass(frozen=True)
class Size:
    episodes: int
    flood_s: float
    #: How long after a flood the master is given to serve again.
    recover_s: float


FULL = Size(episodes=4, flood_s=20.0, recover_s=45.0)
SHORT = Size(episodes=1, flood_s=2.0, recover_s=10.0)
#: Requests of the normal load after each flood.
AFTER = 200


def nofile_limit(pid: int) -> str:
    """``soft/hard`` of process ``pid``'s open-files limit, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return f"{soft}/{hard}"
    return "?"


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
@full_and_short(FULL, SHORT, timeout_s=360)
def test_the_master_at_its_fd_limit_pauses_accepting_and_recovers(server_factory: type[Server],
                                                                   record: Recorder, size: Size) -> None:
    launcher = ("prlimit", f"--nofile={NOFILE}:{NOFILE}", sys.executable, "-m", "dispatcher")
    server = server_factory("--app", APP, workers=2, launcher=launcher).start()
    limits = {nofile_limit(pid) for pid in (server.pid, *server.worker_pids())}
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (server.fd_count() + MASTER_ROOM, NOFILE))
    errors_before = server.status()["master"]["accept_errors"]
    lines_per_episode: list[int] = []
    served_again: list[float | None] = []
    status = StatusProbe(server)
    sent = failed = after_ok = after_failed = 0
    failures: dict[str, int] = {}
    for _ in range(size.episodes):
        server.sync_log()
        first_line = len(server.lines)
        with Flood(server.port, CLIENTS, seconds=size.flood_s, expect=ANSWER) as flood:
            started = time.monotonic()
            while time.monotonic() - started < size.flood_s:
                status.probe()
                time.sleep(PROBE_EVERY_S)  # pacing of the probes
            result = flood.wait()
        sent += result.sent
        failed += result.failed
        for kind, n in result.failures.items():
            failures[kind] = failures.get(kind, 0) + n
        # The episode is over once the master serves again: then a normal load, all of it served.
        served_again.append(served_within(server.port, size.recover_s))
        if served_again[-1] is not None:
            with Load(server.port, clients=2, expect=re.compile(ANSWER), max_requests=AFTER,
                      max_seconds=30, timeout=5) as after:
                after.join(40)
            after_ok += after.ok
            after_failed += after.failed
        lines_per_episode.append(count_lines(server, ACCEPT_LINE, first_line))
        if served_again[-1] is None:
            break  # it does not serve again: no use flooding it more
    final = StatusProbe(server).probe()
    pauses = final["master"]["accept_errors"] - errors_before if final is not None else None
    at_limit = count_processes(server, WORKER_AT_LIMIT)
    spawns_failed = count_lines(server, SPAWN_FAILED)
    episodes = len(served_again)
    slowest = None if None in served_again else max(t for t in served_again if t is not None)

    targets = Targets()
    targets.require(server.proc.poll() is None, "the master stays up")
    targets.require(limits == {f"{NOFILE}/{NOFILE}"}, f"master and workers at {NOFILE} fds ({limits})")
    targets.require(pauses is None or pauses > 0, "the master hit EMFILE")
    targets.require(failures.get("partial", 0) == 0, "no partial answer")
    targets.require(slowest is not None and slowest <= 2.0 and after_ok == AFTER * episodes,
                    f"served again within 2 s of each flood, then {AFTER} of {AFTER} "
                    f"({seconds(slowest, size.recover_s)}; {after_ok} of {AFTER * episodes})")
    targets.require(failed == 0, f"every request of the flood answered ({failed} failed)")
    targets.require(status.answered == status.probes,
                    f"ctl status answered during the flood, within {status.attempts} tries "
                    f"({status.answered} of {status.probes})")
    targets.require(max(lines_per_episode) <= 4,
                    f"at most 4 log lines about accept errors per episode ({max(lines_per_episode)})")
    failed_detail = f" ({', '.join(f'{k} {n}' for k, n in sorted(failures.items()))})" if failures else ""
    record(
        "d. EMFILE at accept",
        f"master and 2 workers at `prlimit --nofile={NOFILE}:{NOFILE}`, then the master's soft limit "
        f"lowered to {MASTER_ROOM} above what it had open; {size.episodes} flood(s) of "
        f"{CLIENTS} concurrent clients (new connection per request) for {size.flood_s:g} s each; "
        f"ctl status every {PROBE_EVERY_S:g} s",
        f"{sent} requests during {episodes} flood(s), {failed} failed{failed_detail}; served again "
        f"{', '.join(seconds(t, size.recover_s) for t in served_again)} after each, then {after_ok} of "
        f"{AFTER * episodes}, {after_failed} failed; {'?' if pauses is None else pauses} accepts failed with "
        f"EMFILE (one pause each), log lines about it per episode: {', '.join(map(str, lines_per_episode))}; "
        f"{at_limit} worker(s) drained at their own fd limit, {spawns_failed} worker start(s) failed with "
        f"EMFILE; {status.describe()}",
        targets,
    )
