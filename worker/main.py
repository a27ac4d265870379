"""Entry point of a worker process: ``python -m worker``, started by the master.

Boot order matters: the channel and ``Hello`` come first so the master hears
of a worker that fails later; the app is imported once, and an import error
is reported over the channel and as a named exit code, never as a crash loop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from shared import cpu_sched, eventloop, logs, protocol
from shared.app_spec import INTERFACES, AppLoadError
from shared.exitcodes import ExitCode
from shared.web_options import WebOptions
from worker import process
from worker.app import load
from worker.runtime import Runtime

log = logging.getLogger(__name__)


class _BootArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"worker: {message}\n")
        sys.exit(ExitCode.WORKER_BOOT_FAILED)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _BootArgumentParser(
        prog="python -m worker",
        description="A dispatcher worker. Started by the master, not by hand.",
    )
    parser.add_argument("--id", type=int, required=True, help="worker slot number")
    parser.add_argument("--channel-fd", type=int, required=True, help="inherited channel fd")
    parser.add_argument("--master-pid", type=int, required=True)
    parser.add_argument("--app", required=True, help="MODULE:ATTRIBUTE")
    parser.add_argument("--interface", choices=INTERFACES, default="auto")
    parser.add_argument("--factory", action="store_true", help="call the attribute to build the app")
    parser.add_argument("--web", type=WebOptions.from_json, default=WebOptions(),
                        help="the ASGI and WSGI interfaces' settings, as JSON (shared.web_options)")
    parser.add_argument("--graceful-timeout", type=float, default=30.0,
                        help="how long a drain may take before the master kills this worker")
    parser.add_argument("--proxy-protocol", action="store_true",
                        help="peers in the web settings' forwarded_allow_ips send a PROXY protocol header")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--uid", type=int, default=None, help="user id to run as")
    parser.add_argument("--gid", type=int, default=None, help="group id to run as")
    parser.add_argument("--log-level", choices=logs.LEVELS, default="info")
    parser.add_argument("--log-format", choices=logs.FORMATS, default="text")
    parser.add_argument("--loop", choices=eventloop.CHOICES, default="auto")
    parser.add_argument("--protocol", type=int, default=None,
                        help="the wire protocol version the master speaks (shared.protocol.VERSION)")
    parser.add_argument("--sched", choices=cpu_sched.MODES, default=None,
                        help="CPU scheduling policy to switch to (the master's may differ)")
    parser.add_argument("--own-listeners", action="store_true",
                        help="the listening sockets the master sends are this worker's alone (reuseport)")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace, chan: socket.socket) -> ExitCode:
    runtime = Runtime(args.id, chan, asyncio.get_running_loop(), args.threads, args.own_listeners,
                      web=args.web, graceful_timeout_s=args.graceful_timeout,
                      proxy_protocol=args.proxy_protocol)
    try:
        try:
            app = load(args.app, args.interface, args.factory)
        except AppLoadError as exc:
            log.debug("app load failed", exc_info=True)
            runtime.fail_boot(ExitCode.APP_LOAD_FAILED, str(exc))
            return ExitCode.APP_LOAD_FAILED
        runtime.start(app)
        return await runtime.wait()
    finally:
        runtime.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup(args.log_level, args.log_format, worker_id=args.id)
    # Ctrl-C reaches the whole process group; the master decides how we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.protocol != protocol.VERSION:
        # New code on disk under an old master: a reload starts workers from
        # the new code, but the master's own code is only replaced by a restart.
        log.error(
            "this worker speaks protocol %d and its master %s; restart the master "
            "(a reload replaces only the workers) to run this version",
            protocol.VERSION, f"protocol {args.protocol}" if args.protocol else "an older one",
        )
        return ExitCode.WORKER_BOOT_FAILED
    if args.sched is not None:
        # Before dropping privileges: switching back may need them.
        failed = cpu_sched.apply(args.sched)
        if failed:
            log.warning("cannot switch to the %s CPU scheduling policy: %s", args.sched, failed)
    try:
        process.drop_privileges(args.uid, args.gid)
    except OSError as exc:
        log.error("cannot switch to uid %s gid %s: %s", args.uid, args.gid, exc)
        return ExitCode.WORKER_BOOT_FAILED
    if not process.bind_to_master(args.master_pid):
        log.error("master %d is gone before the worker started", args.master_pid)
        return ExitCode.MASTER_GONE
    process.set_title(f"dispatcher: worker {args.id} {args.app}")
    try:
        chan = socket.socket(fileno=args.channel_fd)
    except OSError as exc:
        log.error("channel fd %d is unusable: %s", args.channel_fd, exc)
        return ExitCode.WORKER_BOOT_FAILED
    # pass_fds made it inheritable; a handler's child processes must not hold it.
    chan.set_inheritable(False)
    if chan.type != socket.SOCK_SEQPACKET:
        log.error("channel fd %d is not a SOCK_SEQPACKET socket", args.channel_fd)
        return ExitCode.WORKER_BOOT_FAILED
    code = eventloop.run(_serve(args, chan), args.loop)
    if code is ExitCode.MASTER_GONE:
        # Handler threads still running would hold up interpreter exit, and
        # nobody is left to wait for them.
        logging.shutdown()
        os._exit(code)
    return int(code)
