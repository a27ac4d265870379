"""The control socket abused: another uid, malformed input, and idle connections held open.

- Another uid: a child process that setuid()s to nobody (65534) connects
  and sends commands (status, stop, scale, reload). The socket is made
  reachable by hand first (mode 0666 in a 0755 directory), so the master's
  own ``SO_PEERCRED`` check is what refuses; then it is put back to 0600,
  and the file system refuses. Nothing may be carried out.
- Malformed input from the master's own uid: garbage bytes, oversized
  lines, invalid JSON, unknown commands, bad arguments: each answered with
  an error, on a connection that stays usable.
- Idle connections: 100 of them open and silent. ``ctl status`` from the
  master's own uid must still be answered promptly, and the master must
  close each idle one by itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.server import Server
from dispatcher.control import IDLE_TIMEOUT_S
from tests.chaos.support import Recorder, StatusProbe, Targets, full_and_short

APP = "tests.apps.chaos:handler"
NOBODY = 65534
#: What the master's own uid may wait for an answer while others misbehave.
PROMPT_S = 1.0
AS_NOBODY_TIMEOUT_S = 10.0
COMMANDS = [b'{"cmd": "status"}\n', b'{"cmd": "stop"}\n', b'{"cmd": "scale", "workers": 1}\n',
            b'{"cmd": "reload"}\n', b'{"cmd": "message", "payload": 1}\n']


def _garbage() -> bytes:
    return os.urandom(4096).replace(b"\n", b"") + b"\n"


MALFORMED = [
    ("random bytes", _garbage),
    ("a 100 KiB line", lambda: b"x" * 100 * 1024 + b"\n"),
    ("a 1 MiB line", lambda: b"{" * 2**20 + b"\n"),
    ("cut-short JSON", lambda: b'{"cmd": "status"\n'),
    ("not UTF-8", lambda: b"\xff\xfe\xfd\n"),
    ("a JSON array", lambda: b"[1, 2, 3]\n"),
    ("no cmd", lambda: b'{"workers": 3}\n'),
    ("unknown command", lambda: b'{"cmd": "reboot"}\n'),
    ("nested too deeply", lambda: b"[" * 50_000 + b"\n"),
    ("bad argument", lambda: b'{"cmd": "scale", "workers": "all"}\n'),
    ("unknown argument", lambda: b'{"cmd": "status", "verbose": true}\n'),
]


@dataclass(frozen=True)
class Size:
    as_nobody: int
    idle: int
    #: Wait for the master to close the idle connections itself (its request timeout).
    wait_idle_closed: bool


FULL = Size(as_nobody=20, idle=100, wait_idle_closed=True)
SHORT = Size(as_nobody=3, idle=70, wait_idle_closed=False)


def as_nobody(path: str, line: bytes) -> str:
    """What a process running as nobody gets for ``line`` on the control socket ``path``.

    A forked child drops to nobody (groups, gid, then uid), connects, sends
    and reads one line; the parent reads the outcome from a pipe, bounded,
    and ends the child by its pid. ``answer ...``, ``closed``, or ``error ERRNO``.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: plain system calls only, then _exit
        outcome = b"error ?"
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(AS_NOBODY_TIMEOUT_S / 2)
                sock.connect(path)
                with contextlib.suppress(OSError):
                    sock.sendall(line)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                outcome = b"answer " + data.strip() if data else b"closed"
        except OSError as exc:
            outcome = f"error {exc.errno}".encode()
        finally:
            os.write(write_end, outcome[:4096])
            os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], AS_NOBODY_TIMEOUT_S)
        return os.read(read_end, 8192).decode(errors="replace") if ready else "no outcome"
    finally:
        os.close(read_end)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _refused(outcome: str) -> str | None:
    """How ``outcome`` was a refusal (``peercred``, ``file mode``), or None if it was not one."""
    if outcome.startswith("answer "):
        answer = json.loads(outcome.removeprefix("answer "))
        ok = answer.get("ok") is False and "permission denied" in answer.get("error", "")
        return "peercred" if ok else None
    if outcome == f"error {13}":  # EACCES: the file system said no
        return "file mode"
    return None


@contextlib.contextmanager
def _open_dir() -> Iterator[Path]:
    """A directory anyone may enter (the control socket's mode then decides)."""
    path = Path(tempfile.mkdtemp(prefix="dispatcher-chaos-ctl-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def _answer(sock: socket.socket, line: bytes) -> dict[str, object]:
    sock.sendall(line)
    buf = b""
    while not buf.endswith(b"\n"):
        data = sock.recv(65536)
        if not data:
            return {"closed": True}
        buf += data
    answer = json.loads(buf)
    return answer if isinstance(answer, dict) else {"not an object": answer}


@full_and_short(FULL, SHORT, timeout_s=120)
def test_the_control_socket_refuses_and_answers_errors_and_stays_usable(
    server_factory: type[Server], record: Recorder, size: Size
) -> None:
    root = os.geteuid() == 0
    with _open_dir() as folder:
        path = folder / "ctl.sock"
        server = server_factory("--app", APP, "--control", str(path), workers=2).start()
        workers = sorted(server.worker_pids())
        targets = Targets()

        # Another uid.
        refusals: dict[str, int] = {}
        not_refused: list[str] = []
        if root:
            for mode in (0o666, 0o600):
                path.chmod(mode)
                for n in range(size.as_nobody):
                    outcome = as_nobody(str(path), COMMANDS[n % len(COMMANDS)])
                    how = _refused(outcome)
                    if how is None:
                        not_refused.append(outcome[:80])
                    else:
                        refusals[how] = refusals.get(how, 0) + 1
            targets.require(not not_refused, f"every request from uid {NOBODY} refused ({not_refused[:3]})")
            targets.require(sorted(server.worker_pids()) == workers and server.proc.poll() is None,
                            "nothing carried out for it (same master, same workers)")

        # Malformed input, on one connection that must stay usable.
        errors = 0
        wrong: list[str] = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            for what, make in MALFORMED:
                answer = _answer(sock, make())
                if answer.get("ok") is False and answer.get("error"):
                    errors += 1
                else:
                    wrong.append(f"{what}: {str(answer)[:60]}")
            usable = _answer(sock, b'{"cmd": "status"}\n').get("ok") is True
        targets.require(not wrong, f"each malformed request answered with an error ({wrong[:3]})")
        targets.require(usable, "the connection still usable after them")

        # Idle connections.
        server.sync_log()
        first_line = len(server.lines)
        idle: list[socket.socket] = []
        try:
            for _ in range(size.idle):
                idle.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                idle[-1].settimeout(IDLE_TIMEOUT_S + 10)
                idle[-1].connect(str(path))
            while_idle = StatusProbe(server, attempts=1, timeout_s=5.0)
            answered_s: float | None = None
            started = time.monotonic()
            if while_idle.probe() is not None:
                answered_s = time.monotonic() - started
            closed_s: float | None = None
            if size.wait_idle_closed:
                for sock in idle:  # each ends once the master hangs up: EOF, or a reset
                    with contextlib.suppress(ConnectionError):
                        sock.recv(1)
                closed_s = time.monotonic() - started
        finally:
            for sock in idle:
                sock.close()
        server.sync_log()
        turned_away = sum(1 for line in server.lines[first_line:]
                          if re.search(r"control connection refused: \d+ open", line))
        targets.require(answered_s is not None and answered_s <= PROMPT_S,
                    f"ctl status answered within {PROMPT_S:g} s with {size.idle} idle connections open "
                    f"({'not answered' if answered_s is None else f'{answered_s:.2f} s'})")
        if size.wait_idle_closed:
            bound = IDLE_TIMEOUT_S + 5
            targets.require(closed_s is not None and closed_s <= bound,
                            f"every idle connection closed by the master within {bound:g} s")
        after = StatusProbe(server, attempts=1)
        started = time.monotonic()
        targets.require(after.probe() is not None and time.monotonic() - started <= PROMPT_S,
                        f"ctl status answered within {PROMPT_S:g} s afterwards")
        targets.require(server.proc.poll() is None and "Traceback" not in server.log,
                        "the master stays up, no traceback")

    who = (f"{2 * size.as_nobody} requests from uid {NOBODY} refused ({refusals})" if root
           else "not root: the other uid was not tried")
    status_figure = (f"answered in {answered_s:.2f} s" if answered_s is not None
                     else f"not answered ({', '.join(while_idle.failures)})")
    idle_figure = f"ctl status with them open {status_figure}; {turned_away} refusal line(s) logged"
    if closed_s is not None:
        idle_figure += f"; all closed by the master {closed_s:.1f} s after they opened"
    record(
        "g. control socket abuse",
        f"{2 * size.as_nobody if root else 0} requests as uid {NOBODY} (socket mode 0666, then 0600); "
        f"{len(MALFORMED)} malformed requests on one connection; {size.idle} idle connections",
        f"{who}; {errors} of {len(MALFORMED)} malformed answered with an error; "
        f"{size.idle} idle: {idle_figure}",
        targets,
    )
