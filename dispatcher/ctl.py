"""``dispatcher ctl``: the operator's client for a running master's control socket.

It finds the socket (``--control``, else the only live one in the runtime
dir), sends one request, and prints the answer: a table for people, or the
raw JSON result with ``--json`` for scripts. Errors go to stderr with exit
code 1. The protocol is ``dispatcher.control_protocol``; this side is
plain blocking sockets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

from dispatcher.control_protocol import (
    MAX_ANSWER_BYTES,
    LineReader,
    RequestError,
    TooLong,
    decode_answer,
    encode,
)
from dispatcher.rundir import ControlError, is_listening, pid_alive, runtime_dir, socket_pid
from dispatcher.snapshot import Snapshot

if TYPE_CHECKING:
    from rich.console import JustifyMethod

#: How long to wait for the master to answer.
TIMEOUT_S = 10.0
#: A reload starts and waits for every new worker: it may take a while.
RELOAD_TIMEOUT_S = 300.0
#: ``ready`` waits on the master's side; the client allows this much more for the answer.
READY_SLACK_S = 5.0


class CtlError(Exception):
    """Something the operator must be told; the message is the whole story."""


# Finding and talking to the master


def find_socket() -> str:
    """Return the control socket of the one dispatcher running for this user.

    Raises:
        CtlError: none or several are running, or the directory is unsafe.
    """
    try:
        directory = runtime_dir(create=False)
    except ControlError as exc:
        raise CtlError(str(exc)) from None
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        names = []
    except OSError as exc:
        raise CtlError(f"cannot list {directory}: {exc.strerror}") from None
    found = []
    for name in sorted(names):
        pid = socket_pid(name)
        path = os.path.join(directory, name)
        if pid is not None and pid_alive(pid) and _maybe_live(path):
            found.append(path)
    if not found:
        raise CtlError(f"no running dispatcher found in {directory}; pass --control PATH")
    if len(found) > 1:
        listing = "\n  ".join(found)
        raise CtlError(f"several dispatchers are running; pass --control with one of:\n  {listing}")
    return found[0]


def _maybe_live(path: str) -> bool:
    """False only for a socket nobody listens on (its master's pid was reused)."""
    try:
        return is_listening(path)
    except OSError:
        return True  # let the real connection say what is wrong


def request(path: str, cmd: str, timeout_s: float = TIMEOUT_S, **args: Any) -> Any:
    """Send one request to the control socket at ``path``; return its result.

    Raises:
        CtlError: cannot connect, no answer in time, or the master answered
            with an error.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise CtlError(f"cannot connect to {path}: no such socket (is the dispatcher running?)") from None
        except ConnectionRefusedError:
            raise CtlError(f"cannot connect to {path}: connection refused (stale socket?)") from None
        except OSError as exc:
            raise CtlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        try:
            # A master refusing us answers and hangs up at once: read why anyway.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(encode({"cmd": cmd, **args}))
            line = _read_line(sock)
        except TimeoutError:
            raise CtlError(f"no answer from {path} within {timeout_s:g} s") from None
        except OSError as exc:
            raise CtlError(f"lost the connection to {path}: {exc.strerror or exc}") from None
        try:
            return decode_answer(line)
        except RequestError as exc:
            raise CtlError(str(exc)) from None
    finally:
        sock.close()


def _read_line(sock: socket.socket) -> bytes | TooLong:
    lines = LineReader(MAX_ANSWER_BYTES)
    while True:
        data = sock.recv(65536)
        if not data:
            raise CtlError("the master closed the connection without answering")
        events = lines.feed(data)
        if events:
            return events[0]


# Showing results


def human_bytes(n: float | None) -> str:
    """``24536678`` -> ``23.4 MiB``; None -> ``-``."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float | None) -> str:
    """``3725`` -> ``1h 2m``; None -> ``-``."""
    if seconds is None:
        return "-"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _console() -> Any:
    from rich.console import Console

    # A pipe gets no width from the terminal; do not squeeze the table to 80 columns.
    wide = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200
    return Console(width=wide, highlight=False, soft_wrap=False)


def print_status(snapshot: Snapshot) -> None:
    """Print the master line and a ``pm2 ls``-like table of workers."""
    from rich.table import Table
    from rich.text import Text

    master = snapshot["master"]
    console = _console()
    listening = ", ".join(master.get("listening") or []) or "-"
    header = (
        f"master pid {master['pid']}  app {master['app']}  policy {master['policy']}  "
        f"listening {listening}  up {human_duration(master['uptime_s'])}  "
        f"accepted {master['accepted']} ({_num(master['accept_rate'])}/s)  "
        f"pending {master['pending']}  rss {human_bytes(master.get('rss_bytes'))}"
    )
    if master.get("stopping"):
        header += "  STOPPING"
    console.print(Text(header))
    table = Table(box=None, header_style="bold", pad_edge=False)
    columns: list[tuple[str, JustifyMethod]] = [
        ("id", "right"), ("pid", "right"), ("state", "left"), ("uptime", "right"),
        ("restarts", "right"), ("handled", "right"), ("active", "right"),
        ("off/ack/ref", "right"), ("ping ms", "right"), ("lag ms", "right"),
        ("memory", "right"), ("cpu %", "right"), ("fds", "right"), ("last exit", "left"),
    ]
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)
    for w in snapshot["workers"]:
        table.add_row(*(Text(cell) for cell in (
            str(w["id"]),
            _num(w["pid"]),
            w["state"],
            human_duration(w["uptime_s"]) if w["pid"] else "-",
            str(w["restarts"]),
            str(w["handled"]),
            str(w["active"]),
            f"{w['handed_off']}/{w['acked']}/{w['refused']}",
            _num(w.get("ping_rtt_ms"), 2),
            _num(w.get("loop_lag_ms"), 1),
            human_bytes(w.get("rss_bytes")),
            _num(w.get("cpu_percent"), 1),
            _num(w.get("open_fds")),
            w.get("last_exit") or "-",
        )))
    console.print(table)


def print_stats(snapshot: Snapshot) -> None:
    """Print every field of the snapshot: the master's, then one column per worker."""
    from rich.table import Table
    from rich.text import Text

    console = _console()
    master = Table(title="master", title_justify="left", box=None, show_header=False, pad_edge=False)
    master.add_column("key", style="bold")
    master.add_column("value")
    for key, value in snapshot["master"].items():
        master.add_row(Text(key), Text(_stat(key, value)))
    console.print(master)
    workers = snapshot["workers"]
    if not workers:
        return
    console.print()
    table = Table(title="workers", title_justify="left", box=None, pad_edge=False, header_style="bold")
    table.add_column("worker", style="bold")
    for w in workers:
        table.add_column(str(w["id"]), justify="right")
    for key in workers[0]:
        if key == "id":
            continue
        table.add_row(Text(key), *(Text(_stat(key, w.get(key))) for w in workers))
    console.print(table)


def _stat(key: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    if key.endswith("_bytes") and isinstance(value, int):
        return f"{human_bytes(value)} ({value})"
    if key.endswith("_s") and isinstance(value, (int, float)):
        return f"{human_duration(value)} ({value:g} s)"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def print_messages(messages: list[dict[str, Any]]) -> None:
    for m in messages:
        print(f"worker {m['worker']}: {json.dumps(m['payload'])}")


# The command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dispatcher ctl",
        description="Talk to a running dispatcher master over its control socket.",
    )
    parser.add_argument(
        "--control", metavar="PATH",
        help="the master's control socket (default: the only one running in "
        "$XDG_RUNTIME_DIR/dispatcher/)",
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON result (for scripts)")
    parser.add_argument(
        "--timeout", type=float, default=TIMEOUT_S, metavar="SECONDS",
        help="how long to wait for an answer (default %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # --json and --timeout also after the command (``ctl status --json``); given there, they win.
    anywhere = argparse.ArgumentParser(add_help=False)
    anywhere.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    anywhere.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def command(name: str, about: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=about, parents=[anywhere])

    command("status", "master summary and a table of workers")
    command("stats", "every number the master keeps")
    scale = command("scale", "run N workers from now on")
    scale.add_argument("workers", type=int, metavar="N")
    stop = command("stop", "stop the master (graceful unless --fast)")
    stop.add_argument("--fast", action="store_true", help="do not wait for open connections")
    message = command("message", "send a JSON message to one worker or all")
    message.add_argument("--worker", type=int, metavar="N", help="only worker N (default: all)")
    message.add_argument("payload", metavar="JSON", help='the message, as JSON (e.g. \'{"reload": true}\')')
    command("messages", "the last messages workers sent to the master")
    ready = command("ready", "wait until every worker is ready (for deploy scripts); exit 1 if they are "
                    "not within --timeout")
    ready.add_argument("--status", action="store_true", help="then print the status table")
    command("reload", "rolling reload: new workers (code as on disk now) replace the old ones, one at a "
            "time; waits until done (up to 5 minutes unless --timeout)")
    return parser


def run(args: argparse.Namespace) -> None:
    """Carry out the parsed command.

    Raises:
        CtlError: it failed; the message says why.
    """
    path = args.control or find_socket()
    cmd = args.command
    extra: dict[str, Any] = {}
    if cmd == "scale":
        extra["workers"] = args.workers
    elif cmd == "stop":
        extra["graceful"] = not args.fast
    elif cmd == "message":
        try:
            extra["payload"] = json.loads(args.payload)
        except ValueError as exc:
            raise CtlError(f"message: {args.payload!r} is not valid JSON: {exc}") from None
        extra["worker"] = args.worker
    timeout = RELOAD_TIMEOUT_S if cmd == "reload" and args.timeout == TIMEOUT_S else args.timeout
    if cmd == "ready":
        # The master waits up to --timeout; the answer gets a little longer to arrive.
        extra["timeout"] = args.timeout
        timeout = args.timeout + READY_SLACK_S
    result = request(path, cmd, timeout, **extra)
    if args.json:
        print(json.dumps(result, indent=2))
    elif cmd == "status":
        print_status(result)
    elif cmd == "stats":
        print_stats(result)
    elif cmd == "scale":
        print(f"scaled to {result['workers']} worker(s): {result['added']} added, "
              f"{result['removed']} removed")
    elif cmd == "stop":
        print(f"master is stopping ({'fast' if args.fast else 'graceful'})")
    elif cmd == "message":
        target = "all workers" if args.worker is None else f"worker {args.worker}"
        print(f"message sent to {result['sent']} worker(s) ({target})")
    elif cmd == "messages":
        print_messages(result)
    elif cmd == "reload":
        print(f"reloaded: {result['reloaded']} worker(s) replaced")
    elif cmd == "ready":
        if args.status:
            print_status(result)
        else:
            print(f"{len(result['workers'])} worker(s) ready, listening on "
                  f"{', '.join(result['master']['listening']) or '-'}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except CtlError as exc:
        print(f"dispatcher ctl: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Output piped to e.g. head, which has gone: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
