"""100,000 connections through the master: its fd count and memory stay where they were after warm-up.

Measured once the master holds no client connection (an answer ends, the
worker's FIN, before the master has read the ack and closed its copy), on
the master's pid: its open fds exactly, its RSS within a small slack for
the allocator.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from bench.flood import Flood
from bench.server import Server
from tests.apps.chaos import ANSWER
from tests.chaos.support import Recorder, Targets, full_and_short
from tests.helpers import wait_for

APP = "tests.apps.chaos:handler"
CLIENTS = 16
#: RSS may move by this much, as the allocator keeps or returns pages: a leak of a few
#: hundred bytes per connection would be tens of MiB over the full run.
RSS_SLACK = 4 * 2**20


@dataclass(frozen=True)
class Size:
    warm_up: int
    connections: int


FULL = Size(warm_up=5_000, connections=100_000)
SHORT = Size(warm_up=1_000, connections=5_000)


def _settled(server: Server) -> tuple[int, int]:
    """The master's (open fds, RSS) once it holds no client connection."""
    master = psutil.Process(server.pid)

    def holds_none() -> bool:
        return all(c.status == psutil.CONN_LISTEN for c in master.net_connections("tcp"))

    wait_for(holds_none, 10, "the master still holds client connections")
    return server.fd_count(), master.memory_info().rss


@full_and_short(FULL, SHORT, timeout_s=240)
def test_the_master_keeps_no_fd_or_memory_per_connection(server_factory: type[Server], record: Recorder,
                                                         size: Size) -> None:
    server = server_factory("--app", APP, workers=2).start()
    warm = Flood(server.port, CLIENTS, seconds=120, requests=size.warm_up, expect=ANSWER).start().wait()
    fds_before, rss_before = _settled(server)
    flood = Flood(server.port, CLIENTS, seconds=300, requests=size.connections, expect=ANSWER).start().wait()
    fds_after, rss_after = _settled(server)

    targets = Targets()
    targets.require(warm.failed == 0 and flood.failed == 0,
                    f"every connection answered ({flood.failed} failed: {flood.describe_failures()})")
    targets.require(flood.sent == size.connections, f"{size.connections} connections made ({flood.sent})")
    targets.require(fds_after == fds_before, f"the master's fds stay at {fds_before} ({fds_after})")
    targets.require(rss_after - rss_before <= RSS_SLACK,
                    f"the master's RSS grows by at most {RSS_SLACK >> 20} MiB "
                    f"({(rss_after - rss_before) / 2**20:+.1f} MiB)")
    record(
        "c. many connections",
        f"{size.connections:,} connections (after {size.warm_up:,} to warm up) by {CLIENTS} concurrent "
        "clients, a new connection per request, 2 workers",
        f"{flood.sent:,} answered in {flood.elapsed_s:.1f} s ({flood.rate:,.0f}/s), {flood.failed} failed; "
        f"master fds {fds_before} before, {fds_after} after; RSS {rss_before / 2**20:.1f} MiB before, "
        f"{rss_after / 2**20:.1f} MiB after ({(rss_after - rss_before) / 1024:+.0f} KiB)",
        targets,
    )
