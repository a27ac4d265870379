"""The command line: ``python -m dispatcher`` and the ``dispatcher`` script."""

from __future__ import annotations

import argparse
import sys

from dispatcher import distribution, privileges
from dispatcher.config import DEFAULT_BIND, Config, default_workers
from dispatcher.listeners import BindError, BindSpec, parse_bind, systemd_binds
from dispatcher.master import Master
from dispatcher.version import __version__
from shared import cpu_sched, eventloop, logs
from shared.app_spec import INTERFACES, AppLoadError, split_spec
from shared.exitcodes import ExitCode
from shared.protocol import MAX_FDS
from shared.web_options import HTTP_CHOICES, LIFESPAN_CHOICES, WS_CHOICES, WebOptions

EPILOG = """\
apps (--app MODULE:ATTRIBUTE), told apart by --interface auto:
  async def app(scope, receive, send)   ASGI 3 (FastAPI, Starlette), through uvicorn's protocols
  def app(environ, start_response)      WSGI (Flask, Django), on a thread pool (--threads)
  async def handler(reader, writer)     asyncio streams, like asyncio.start_server
  def handler(sock, addr)               blocking, run on a thread pool (--threads)
  async def serve(worker)               custom server: async for sock, addr in worker.connections()
ASGI and WSGI need the web extra: pip install 'rr-dispatcher[web]'.

operating it: python -m dispatcher ctl status (also: stats, scale N, stop, message);
see python -m dispatcher ctl --help.

signals: TERM/INT stop gracefully (stop accepting, let open connections
finish up to --graceful-timeout, then kill), after --drain-delay if given
(/readyz says 503 meanwhile; TERM/INT again skips it); a second INT, or
QUIT, stops fast. HUP: rolling reload (new workers first, then the old ones drain).
TTIN/TTOU: one worker more/less.

exit codes: 0 stopped, 1 error, 2 bad usage, 3 worker failed to boot,
4 app failed to load.
"""


# The argument types only parse; ``Config`` checks every range, once.


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None


_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _size(text: str) -> int:
    """``512M``, ``1.5G``, ``1048576``: bytes (binary units, an optional trailing B or iB)."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = raw[-1:] if raw[-1:] in _SIZE_UNITS else ""
    try:
        value = float(raw[: len(raw) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512M or 2G") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return int(value * _SIZE_UNITS[unit])


def _bind(text: str) -> BindSpec:
    try:
        return parse_bind(text)
    except BindError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _app(text: str) -> str:
    try:
        split_spec(text)
    except AppLoadError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dispatcher",
        description=(
            "Run a multi-process server: the master accepts every connection and hands "
            "it to a worker process (round-robin over SCM_RIGHTS, as Node's cluster does), "
            "or lets the workers accept themselves (shared, reuseport)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--app", required=True, type=_app, metavar="MODULE:ATTRIBUTE",
        help="the handler to serve, e.g. examples.hello:handler",
    )
    parser.add_argument(
        "--interface", choices=INTERFACES, default=Config.interface,
        help="how workers serve the app: asgi, wsgi, streams, blocking or server (see below); "
        "auto: told from the app's signature, and logged at start (default %(default)s)",
    )
    parser.add_argument(
        "--factory", action="store_true",
        help="MODULE:ATTRIBUTE is a factory: each worker calls it with no arguments to build the app",
    )
    parser.add_argument(
        "--bind", "-b", action="append", type=_bind, metavar="ADDRESS",
        help=f"HOST:PORT, [IPV6]:PORT, unix:/path or fd://N (an inherited listening socket); "
        f"repeat for several (default {DEFAULT_BIND}, or the sockets systemd passed with "
        "LISTEN_FDS); port 0 picks a free port, logged at start",
    )
    parser.add_argument(
        "--proxy-protocol", action="store_true",
        help="peers in --forwarded-allow-ips (a load balancer, HAProxy) open each connection with a "
        "PROXY protocol header, v1 or v2: the workers read it and every interface sees the client it "
        "names (ASGI scope['client'], WSGI REMOTE_ADDR, the access log, a streams writer's peername, "
        "a blocking or custom server's addr); such a peer's connection without a valid header within "
        "5s is closed (logged once per burst). Any other peer is not trusted: its connection is "
        "served as is, and a header it sends reaches the app as data. A Unix-socket peer is trusted "
        "only with --forwarded-allow-ips '*'",
    )
    parser.add_argument(
        "--workers", "-w", type=_whole_number, metavar="N",
        help="worker processes (default: $WEB_CONCURRENCY, else the number of CPUs)",
    )
    parser.add_argument(
        "--policy", choices=distribution.NAMES, default=Config.policy,
        help="round-robin: the master hands each connection to the next free worker; "
        "shared: workers accept on one shared socket; reuseport: one SO_REUSEPORT socket "
        "per worker (default %(default)s)",
    )
    parser.add_argument(
        "--window", type=_whole_number, default=Config.window, metavar="W",
        help=f"round-robin: hand-offs a worker may hold un-acked, 1 to {MAX_FDS} (default %(default)s; "
        "1 is Node's behaviour). Workers ack as each handler starts, so the window only fills while a "
        "worker is busy or waiting for a CPU: a larger one lets the master send all it accepted "
        "in one turn at once (a datagram per worker per 16), a smaller one queues fewer connections "
        "behind a worker stuck in CPU-bound code while no other worker is free (with one free, "
        "the least loaded goes first)",
    )
    parser.add_argument(
        "--master-sched", choices=cpu_sched.MODES, default=Config.master_sched,
        help="round-robin: the master's CPU scheduling policy. batch (SCHED_BATCH): its "
        "wake-ups do not preempt a busy worker, so under load it hands off several "
        "connections per wake-up; with an idle CPU it runs at once. normal: the default "
        "policy (default %(default)s)",
    )
    parser.add_argument(
        "--backlog", type=_whole_number, default=Config.backlog, metavar="N",
        help="listen() backlog (default %(default)s)",
    )
    parser.add_argument(
        "--max-pending", type=_whole_number, default=Config.max_pending, metavar="N",
        help="round-robin: connections the master holds while no worker is free; when full "
        "it stops accepting and the kernel backlog holds the rest (default %(default)s). The "
        "open-files limit bounds it too: the master keeps fds back to start workers and answer "
        "its control socket, and says at start when that caps the queue",
    )
    parser.add_argument(
        "--pending-timeout", type=_seconds, default=Config.pending_timeout_s, metavar="SECONDS",
        help="round-robin: close a connection that waited this long for a worker "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--graceful-timeout", type=_seconds, default=Config.graceful_timeout_s, metavar="SECONDS",
        help="on TERM/INT, how long open connections may take to finish; also how long a worker "
        "replaced (reload, recycling, scale-down) or draining by itself has before it is killed "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--drain-delay", type=_seconds, default=Config.drain_delay_s, metavar="SECONDS",
        help="on TERM/INT, first keep accepting and serving this long while /readyz (see --metrics) "
        "answers 503, so a load balancer's health check takes this instance out before its "
        "listeners close; then stop gracefully. TERM or INT again skips the delay, QUIT stops "
        "fast (default %(default)s: no delay)",
    )
    parser.add_argument(
        "--threads", type=_whole_number, metavar="N",
        help="thread pool size per worker for blocking handlers and WSGI apps "
        "(default: Python's, min(32, CPUs + 4))",
    )
    parser.add_argument(
        "--max-requests", type=_whole_number, default=Config.max_requests, metavar="N",
        help="replace a worker after it took N connections (new one first, then the old one "
        "drains; default: never)",
    )
    parser.add_argument(
        "--max-requests-jitter", type=_whole_number, default=Config.max_requests_jitter, metavar="J",
        help="each worker's limit is --max-requests plus a random 0..J, so they do not all "
        "recycle at once (default %(default)s)",
    )
    parser.add_argument(
        "--max-memory", type=_size, default=Config.max_memory, metavar="SIZE",
        help="replace a worker whose RSS exceeds SIZE (e.g. 512M, 2G), checked every ping "
        "interval (default: never)",
    )
    parser.add_argument(
        "--reload-batch", type=_whole_number, default=Config.reload_batch, metavar="N",
        help="rolling reload (HUP, ctl reload): workers replaced at a time (default %(default)s)",
    )
    parser.add_argument(
        "--user", metavar="USER",
        help="run workers as this user (name or uid); the master keeps its own, "
        "binds first and owns the control socket",
    )
    parser.add_argument(
        "--group", metavar="GROUP",
        help="run workers with this group (name or gid; default: --user's primary group)",
    )
    parser.add_argument(
        "--ping-interval", type=_seconds, default=Config.ping_interval_s, metavar="SECONDS",
        help="how often the master pings each worker's event loop; 0 turns pings off "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--ping-timeout", type=_seconds, default=Config.ping_timeout_s, metavar="SECONDS",
        help="a worker silent this long is killed and replaced (default %(default)s)",
    )
    parser.add_argument(
        "--boot-timeout", type=_seconds, default=Config.boot_timeout_s, metavar="SECONDS",
        help="a worker not ready this long after it started (importing the app) is killed; "
        "also how long a reload waits for each new worker (default %(default)s)",
    )
    parser.add_argument(
        "--control", metavar="PATH",
        help="operator control socket (default: $XDG_RUNTIME_DIR/dispatcher/PID.sock, "
        "mode 0600 in a 0700 directory); 'none' for no socket",
    )
    parser.add_argument(
        "--metrics", metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics, and probes: /healthz (200 "
        "while the master's event loop answers) and /readyz (200 while a worker is ready and the "
        "master is not stopping or draining; else 503 and why). Unauthenticated: bind a private "
        "address (default: off)",
    )
    parser.add_argument(
        "--loop", choices=eventloop.CHOICES, default=Config.loop,
        help="event loop for the master and workers; auto: uvloop when installed "
        "(default %(default)s)",
    )
    _add_web_options(parser)
    parser.add_argument(
        "--log-level", choices=logs.LEVELS, default=Config.log_level, help="(default %(default)s)"
    )
    parser.add_argument(
        "--log-format", choices=logs.FORMATS, default=Config.log_format,
        help="text lines, or one JSON object a line (default %(default)s)",
    )
    return parser


def _add_web_options(parser: argparse.ArgumentParser) -> None:
    defaults = WebOptions()
    web = parser.add_argument_group(
        "ASGI and WSGI apps", "named and meant as uvicorn's options; the workers run uvicorn's protocols")
    web.add_argument("--root-path", default=defaults.root_path, metavar="PATH",
                     help="the ASGI root_path (WSGI SCRIPT_NAME) for an app mounted below a path "
                     "by a proxy (default: none)")
    web.add_argument("--proxy-headers", action=argparse.BooleanOptionalAction, default=defaults.proxy_headers,
                     help="take the client address and scheme from X-Forwarded-For and X-Forwarded-Proto "
                     "when the peer is in --forwarded-allow-ips (default: on)")
    web.add_argument("--forwarded-allow-ips", metavar="IPS", default=defaults.forwarded_allow_ips,
                     help="comma-separated addresses or networks trusted for proxy headers (and for "
                     "--proxy-protocol, whatever the interface), or '*' "
                     "(default: $FORWARDED_ALLOW_IPS, else 127.0.0.1,::1)")
    web.add_argument("--timeout-keep-alive", type=_whole_number, default=defaults.timeout_keep_alive,
                     metavar="SECONDS", help="close a keep-alive connection idle this long "
                     "(default %(default)s)")
    web.add_argument("--limit-concurrency", type=_whole_number, metavar="N",
                     help="per worker: answer 503 to a request when N connections or N tasks are open, "
                     "its own connection counted, as uvicorn does (default: no limit)")
    web.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=defaults.access_log,
                     help="log a line per request, naming the worker (default: on)")
    web.add_argument("--http", choices=HTTP_CHOICES, default=defaults.http,
                     help="HTTP/1.1 parser: httptools, or h11 (pure Python); auto: httptools when "
                     "installed (default %(default)s)")
    web.add_argument("--ws", choices=WS_CHOICES, default=defaults.ws,
                     help="WebSocket protocol implementation; none turns WebSockets off "
                     "(default %(default)s)")
    web.add_argument("--lifespan", choices=LIFESPAN_CHOICES, default=defaults.lifespan,
                     help="the ASGI lifespan: on, startup runs in each worker before it is ready and a "
                     "failure fails the boot; auto, the same unless the app does not support it; off "
                     "(default %(default)s)")
    web.add_argument("--ssl-keyfile", metavar="PATH", help="TLS private key (the workers do TLS; "
                     "the master never reads a byte)")
    web.add_argument("--ssl-certfile", metavar="PATH", help="TLS certificate chain")


def _web_options(args: argparse.Namespace) -> WebOptions:
    return WebOptions(
        root_path=args.root_path, proxy_headers=args.proxy_headers,
        forwarded_allow_ips=args.forwarded_allow_ips, timeout_keep_alive=args.timeout_keep_alive,
        limit_concurrency=args.limit_concurrency, access_log=args.access_log, http=args.http, ws=args.ws,
        lifespan=args.lifespan, ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
    )


def config_from_args(argv: list[str] | None = None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        eventloop.loop_factory(args.loop)
    except ValueError as exc:
        parser.error(str(exc))
    if args.metrics is not None:
        try:
            spec = parse_bind(args.metrics)
        except BindError as exc:
            parser.error(f"--metrics: {exc}")
        if spec.is_unix:
            parser.error("--metrics: needs HOST:PORT")
    try:
        uid, gid = privileges.resolve(args.user, args.group)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        workers = default_workers() if args.workers is None else args.workers
    except ValueError as exc:
        parser.error(str(exc))
    inherited = systemd_binds()
    binds: list[BindSpec] = []
    for spec in [*(args.bind or []), *inherited]:
        # fd://3 given and passed by systemd too: one listener, or it is closed twice.
        if all(spec.fd != b.fd if spec.fd is not None else spec.text != b.text for b in binds):
            binds.append(spec)
    binds = binds or [parse_bind(DEFAULT_BIND)]
    try:
        return Config(
            app=args.app,
            interface=args.interface,
            factory=args.factory,
            web=_web_options(args),
            binds=binds,
            proxy_protocol=args.proxy_protocol,
            workers=workers,
            policy=args.policy,
            window=args.window,
            master_sched=args.master_sched,
            backlog=args.backlog,
            max_pending=args.max_pending,
            pending_timeout_s=args.pending_timeout,
            graceful_timeout_s=args.graceful_timeout,
            drain_delay_s=args.drain_delay,
            threads=args.threads,
            log_level=args.log_level,
            log_format=args.log_format,
            loop=args.loop,
            ping_interval_s=args.ping_interval,
            ping_timeout_s=args.ping_timeout,
            boot_timeout_s=args.boot_timeout,
            control="" if args.control == "none" else args.control,
            metrics=args.metrics,
            max_requests=args.max_requests,
            max_requests_jitter=args.max_requests_jitter,
            max_memory=args.max_memory,
            reload_batch=args.reload_batch,
            uid=uid,
            gid=gid,
        )
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["ctl"]:
        from dispatcher import ctl

        return ctl.main(args[1:])
    config = config_from_args(args)
    logs.setup(config.log_level, config.log_format)
    try:
        return Master(config).run()
    except KeyboardInterrupt:
        return ExitCode.OK
