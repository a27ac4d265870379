"""The master's settings: what the command line (or a library user) asks for, checked once.

A ``Config`` does not change while the master runs (it is frozen); what
does (the number of workers after a scale, say) lives in the part that
changes it. The command line takes its defaults from here and only parses
its arguments; ``__post_init__`` is the one place settings are checked (each
in its range, against each other and against the protocol's limits), so a
bad value is one clear line before anything starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from dispatcher.listeners import DEFAULT_BACKLOG, BindSpec, parse_bind
from shared.app_spec import INTERFACES
from shared.protocol import MAX_FDS
from shared.web_options import WebOptions

DEFAULT_BIND = "127.0.0.1:8000"


def default_workers() -> int:
    """``WEB_CONCURRENCY`` if set (as gunicorn and uvicorn read it), else the usable CPUs."""
    env = os.environ.get("WEB_CONCURRENCY", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"WEB_CONCURRENCY={env!r} is not a positive whole number")
        return int(env)
    return len(os.sched_getaffinity(0)) or 1


@dataclass(frozen=True)
class Config:
    """Every setting of the master (see ``python -m dispatcher --help`` for their meaning).

    Raises:
        ValueError: a setting is out of range or contradicts another; the
            message names it as the command line does.
    """

    app: str
    #: How workers serve the app (``shared.app_spec.INTERFACES``); auto: told from the app object.
    interface: str = "auto"
    #: The app spec names a factory: called with no arguments, it returns the app.
    factory: bool = False
    #: The ASGI and WSGI interfaces' settings (uvicorn's names).
    web: WebOptions = field(default_factory=WebOptions)
    binds: list[BindSpec] = field(default_factory=lambda: [parse_bind(DEFAULT_BIND)])
    #: Peers in ``web.forwarded_allow_ips`` send a PROXY protocol header (v1 or v2), read by the workers.
    proxy_protocol: bool = False
    workers: int = 1
    policy: str = "round-robin"
    #: Round-robin: hand-offs a worker may hold un-acked (Node: 1), at most ``MAX_FDS``.
    #: The most: what a busy master accepts in one turn then goes out at once, not one ack at a time.
    window: int = 64
    #: The master's CPU scheduling policy (``shared.cpu_sched``), round-robin only.
    master_sched: str = "batch"
    backlog: int = DEFAULT_BACKLOG
    max_pending: int = 1024
    pending_timeout_s: float = 30.0
    graceful_timeout_s: float = 30.0
    #: On TERM/INT, keep serving this long with /readyz answering 503 before the graceful stop.
    drain_delay_s: float = 0.0
    threads: int | None = None
    log_level: str = "info"
    log_format: str = "text"
    loop: str = "auto"
    #: 0 turns health pings off.
    ping_interval_s: float = 1.0
    ping_timeout_s: float = 30.0
    #: A worker not ready this long after it started is killed (counts as a failed boot).
    boot_timeout_s: float = 60.0
    #: The operator control socket; None: the default path; "" : none.
    control: str | None = None
    #: ``HOST:PORT`` to serve Prometheus metrics on, or None.
    metrics: str | None = None
    #: Recycle a worker after this many connections (0: never), plus up to jitter more.
    max_requests: int = 0
    max_requests_jitter: int = 0
    #: Recycle a worker whose RSS exceeds this many bytes (0: never).
    max_memory: int = 0
    #: Workers replaced at a time in a rolling reload.
    reload_batch: int = 1
    #: Numeric ids workers switch to, when the master was told to drop privileges.
    uid: int | None = None
    gid: int | None = None

    def __post_init__(self) -> None:
        if self.interface not in INTERFACES:
            raise ValueError(f"--interface must be one of {', '.join(INTERFACES)}, not {self.interface!r}")
        self.web.check()
        for option, value in (("--workers", self.workers), ("--backlog", self.backlog),
                              ("--max-pending", self.max_pending), ("--reload-batch", self.reload_batch),
                              ("--threads", 1 if self.threads is None else self.threads)):
            if value < 1:
                raise ValueError(f"{option} must be at least 1")
        for option, number in (("--pending-timeout", self.pending_timeout_s),
                               ("--graceful-timeout", self.graceful_timeout_s),
                               ("--drain-delay", self.drain_delay_s),
                               ("--ping-interval", self.ping_interval_s),
                               ("--ping-timeout", self.ping_timeout_s),
                               ("--boot-timeout", self.boot_timeout_s),
                               ("--max-requests", self.max_requests),
                               ("--max-memory", self.max_memory)):
            if not number >= 0:  # NaN too
                raise ValueError(f"{option} must not be negative")
        if not 1 <= self.window <= MAX_FDS:
            # The policy's bound; 64 un-acked hand-offs go out in datagrams of 16.
            raise ValueError(f"--window must be 1 to {MAX_FDS}")
        if self.ping_interval_s and self.ping_timeout_s <= self.ping_interval_s:
            raise ValueError("--ping-timeout must be longer than --ping-interval")
        if self.max_requests_jitter < 0:
            raise ValueError("--max-requests-jitter must not be negative")
