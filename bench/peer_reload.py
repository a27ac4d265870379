"""A rolling reload under load, for any server of the comparison that can reload.

Two loads run together on one server: ``bench.load.Load`` threads, each a
new connection per request (``Connection: close``), and
``bench.keepalive.KeepAliveLoad`` threads, each a keep-alive connection
that sends a request again once if its reused connection was closed (as
browsers do). After ``LOAD_BEFORE_S``, the server is told to reload as it
knows how (``Running.reload``: this project's ``ctl reload``, SIGHUP for
uvicorn's supervisor, gunicorn and granian), and the load goes on
``LOAD_AFTER_S`` after every worker was replaced. Each kind of client's
requests are counted during the reload and over the whole run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bench.keepalive import KeepAliveLoad, Tally
from bench.load import JOIN_TIMEOUT_S, Load, failure_kind
from bench.peer_servers import RELOAD_TIMEOUT_S, Kind, Running

LOAD_BEFORE_S = 1.5
LOAD_AFTER_S = 1.0


@dataclass
class PeerReload:
    """One reload under load of one server."""

    server: str
    workers: int
    #: From telling the server to reload to every worker replaced.
    reload_s: float
    #: ``ok``, or ``failed: ...``.
    answer: str
    #: The new-connection-per-request clients: during the reload, and the whole run.
    close_during: Tally
    close_total: Tally
    #: The keep-alive clients (retrying once on a closed idle connection).
    keepalive_during: Tally
    keepalive_total: Tally
    pids_before: list[int] = field(default_factory=list)
    pids_after: list[int] = field(default_factory=list)
    server_log: str = ""

    @property
    def failed(self) -> int:
        """Failed requests of both kinds of client over the whole run."""
        return self.close_total.failed + self.keepalive_total.failed


def _tally(load: Load, start: float, end: float) -> Tally:
    served, failed, errors = load.between(start, end)
    kinds: dict[str, int] = {}
    for error, n in errors.items():
        kinds[failure_kind(error)] = kinds.get(failure_kind(error), 0) + n
    resets = kinds.get("reset", 0)
    return Tally(served=served, failed=failed, failures=kinds, retried=0, resets=resets)


def run_reload(kind: Kind, workers: int, close_clients: int, keepalive_clients: int,
               threads: int = 4) -> PeerReload:
    """Start ``kind``, load it with both kinds of client, reload it, stop it.

    Raises:
        StartError: the server did not get ready.
    """
    bound = RELOAD_TIMEOUT_S + LOAD_BEFORE_S + LOAD_AFTER_S + 30.0
    with Running(kind, workers, threads) as server:
        pids_before = server.worker_pids()
        with Load(server.port, close_clients, path="/", max_seconds=bound) as close, \
                KeepAliveLoad(server.port, keepalive_clients, max_seconds=bound) as keepalive:
            started = time.monotonic()
            time.sleep(LOAD_BEFORE_S)
            reload_at = time.monotonic()
            answer = server.reload()
            reloaded_at = time.monotonic()
            time.sleep(LOAD_AFTER_S)
            ended = time.monotonic()
        pids_after = server.worker_pids()
    whole = ended + JOIN_TIMEOUT_S  # a request under way at the end is counted too
    return PeerReload(
        server=kind.key, workers=workers, reload_s=reloaded_at - reload_at, answer=answer,
        close_during=_tally(close, reload_at, reloaded_at), close_total=_tally(close, started, whole),
        keepalive_during=keepalive.between(reload_at, reloaded_at),
        keepalive_total=keepalive.between(started, whole),
        pids_before=pids_before, pids_after=pids_after, server_log=server.log,
    )
