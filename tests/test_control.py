"""The control socket and ``dispatcher ctl``: real masters, real clients, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_type_hints

import psutil
import pytest

from bench.server import ROOT, Server
from dispatcher.control import IDLE_TIMEOUT_S, MAX_CONNECTIONS, ControlServer
from dispatcher.control_protocol import MAX_REQUEST_BYTES, LineReader, TooLong
from dispatcher.ctl import request
from dispatcher.rundir import ControlError
from dispatcher.snapshot import MasterFigures, Snapshot, WorkerFigures
from tests.helpers import wait_for

APP = "tests.apps.handlers:pid"
WORKER_KEYS = {
    "id", "pid", "state", "uptime_s", "restarts", "last_exit", "handed_off", "acked", "refused",
    "handled", "accepted", "active", "ping_rtt_ms", "loop_lag_ms", "rss_bytes", "cpu_percent",
    "open_fds",
}


def start(server_factory: type[Server], path: Path | str, workers: int = 2, app: str = APP) -> Server:
    """Start a master with its control socket at ``path``; wait until its workers are ready."""
    server = server_factory("--app", app, "--control", str(path), workers=workers).start()
    assert f"control socket at {path}\n" in server.log
    return server


def start_at_default_path(server_factory: type[Server], runtime_dir: Path) -> Server:
    """Start a master with no ``--control``: its socket is the default, in ``runtime_dir``."""
    server = server_factory("--app", APP, workers=1, env={"XDG_RUNTIME_DIR": str(runtime_dir)},
                            private_control=False)
    server.control_path = str(runtime_dir / "dispatcher" / f"{server.pid}.sock")
    return server.start()


def ctl(path: Path | str | None, *args: str,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    control = ["--control", str(path)] if path is not None else []
    # Its output is a pipe: without COLUMNS it lays tables out wide, as for a user's pipe. The test
    # runner's processes may set COLUMNS (pytest-xdist's: 80), which would wrap them.
    inherited = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.ctl", *control, *args], cwd=ROOT, capture_output=True,
        text=True, timeout=20, env={**inherited, **(env or {})},
    )


def ctl_json(path: Path | str, *args: str) -> Any:
    done = ctl(path, "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@contextlib.contextmanager
def connect(path: Path | str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(str(path))
        yield sock
    finally:
        sock.close()


def ask(sock: socket.socket, line: bytes) -> dict[str, Any]:
    """Send one raw request line; return the decoded answer line."""
    sock.sendall(line)
    return read_answer(sock)


def read_answer(sock: socket.socket) -> dict[str, Any]:
    """The next answer line (the master sends nothing unasked, so nothing follows it yet)."""
    buf = b""
    while not buf.endswith(b"\n"):
        data = sock.recv(65536)
        assert data, f"connection closed; got {buf!r}"
        buf += data
    answer = json.loads(buf)
    assert isinstance(answer, dict)
    return answer


def last_answer(sock: socket.socket) -> dict[str, Any]:
    """The one answer the master sends before it closes the connection; checks that it closes."""
    buf = b""
    while data := sock.recv(65536):
        buf += data
    lines = buf.splitlines()
    assert len(lines) == 1, f"one answer, then the end; got {buf!r}"
    answer = json.loads(lines[0])
    assert isinstance(answer, dict)
    return answer


# Status and stats


def test_status_table_shows_every_worker(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    server = start(server_factory, path, workers=3)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pids = server.worker_pids()
    done = ctl(path, "status")
    assert done.returncode == 0, done.stderr
    assert f"master pid {server.pid}" in done.stdout
    assert f"listening {server.address}" in done.stdout
    for pid in pids:
        assert re.search(rf"\b{pid}\b.*\bready\b", done.stdout), done.stdout
    assert re.search(r"\d+\.\d MiB", done.stdout)

    snapshot = ctl_json(path, "status")
    assert snapshot["master"]["pid"] == server.pid
    assert snapshot["master"]["listening"] == [server.address]
    workers = snapshot["workers"]
    assert sorted(w["pid"] for w in workers) == sorted(pids)
    assert [w["id"] for w in workers] == [0, 1, 2]
    for w in workers:
        assert set(w) >= WORKER_KEYS, set(w) ^ WORKER_KEYS
        assert w["state"] == "ready"
    # What travels is exactly the typed snapshot the client, metrics and the lab read.
    assert set(snapshot) == set(Snapshot.__annotations__)
    assert set(snapshot["master"]) == set(get_type_hints(MasterFigures))
    assert all(set(w) == set(WorkerFigures.__annotations__) for w in workers)


def test_stats_lists_every_field(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    server = start(server_factory, path, workers=2)
    done = ctl(path, "stats")
    assert done.returncode == 0, done.stderr
    for key in ("accepted", "pending", "accept_rate", "policy", *WORKER_KEYS - {"id"}):
        assert re.search(rf"^\s*{key}\b", done.stdout, re.M), key
    for pid in server.worker_pids():
        assert str(pid) in done.stdout
    assert ctl_json(path, "stats")["master"]["pid"] == server.pid


# Scaling


def test_scale_up_then_down(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    server = start(server_factory, path, workers=2)
    master = psutil.Process(server.pid)

    done = ctl(path, "scale", "4")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "scaled to 4 worker(s): 2 added, 0 removed"
    new_ids = {w["id"] for w in server.wait_ready()["workers"]} - {0, 1}
    assert new_ids == {2, 3}
    workers = ctl_json(path, "status")["workers"]
    assert [w["id"] for w in workers] == [0, 1, 2, 3]
    assert {w["pid"] for w in workers} == {c.pid for c in master.children()}
    assert len(server.worker_pids()) == 4

    result = ctl_json(path, "scale", "1")
    assert result == {"added": 0, "removed": 3, "workers": 1}
    removed = {int(server.wait_line(r"worker (\d+) removed \(scaled down\)").group(1)) for _ in range(3)}
    assert removed == {1, 2, 3}
    workers = ctl_json(path, "status")["workers"]
    assert [w["id"] for w in workers] == [0]
    wait_for(lambda: [c.pid for c in master.children()] == [workers[0]["pid"]], 10, "one worker left")


def test_scale_errors_are_reported(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    start(server_factory, path, workers=1)
    done = ctl(path, "scale", "0")
    assert done.returncode == 1
    assert "at least 1 worker" in done.stderr
    assert done.stdout == ""


# Who may talk


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory anyone may traverse (tmp_path's parents are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="dispatcher-ctl-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_other_uid_is_refused(server_factory: type[Server], open_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    nobody = pwd.getpwnam("nobody")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv (util-linux) to run a client as nobody")
    as_nobody = [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    # A stdlib-only client, so that it runs wherever the checkout is: any
    # interpreter nobody can start will do (this venv's may be out of reach).
    python = next((exe for exe in (sys.executable, "/usr/bin/python3") if subprocess.run(
        [*as_nobody, exe, "-I", "-c", "pass"], capture_output=True, timeout=20).returncode == 0), None)
    if python is None:
        pytest.skip("user nobody cannot start any Python here")
    path = open_dir / "ctl.sock"
    server = start(server_factory, path, workers=1)
    path.chmod(0o666)  # past the file system check, so that SO_PEERCRED is what refuses

    client = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.settimeout(10)\n"
        "s.connect(sys.argv[1])\n"
        "s.sendall(b'{\"cmd\": \"status\"}\\n')\n"
        "print(s.makefile().readline().strip())\n"
    )
    done = subprocess.run([*as_nobody, python, "-I", "-c", client, str(path)],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer == {"ok": False, "error": f"permission denied: uid {nobody.pw_uid} is not allowed"}
    warning = server.wait_line(rf"WARNING control connection from uid {nobody.pw_uid} \(pid (\d+)\) refused")
    assert int(warning.group(1)) > 0
    # The master itself is still served.
    assert ctl_json(path, "status")["master"]["pid"] == server.pid


# Bad requests


def test_malformed_requests_get_error_answers(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    server = start(server_factory, path, workers=1)
    bad = [
        (b"this is not json\n", "not valid JSON"),
        (b"[1, 2, 3]\n", "must be a JSON object, not an array"),
        (b'"status"\n', "must be a JSON object, not a string"),
        (b'{"workers": 3}\n', 'needs "cmd"'),
        (b'{"cmd": "reboot"}\n', "unknown command 'reboot'"),
        (b'{"cmd": "scale", "workers": "x"}\n', '"workers" must be a whole number, not a string'),
        (b'{"cmd": "scale", "workers": true}\n', '"workers" must be a whole number, not a boolean'),
        (b'{"cmd": "scale"}\n', 'scale needs "workers"'),
        (b'{"cmd": "scale", "workers": 100000}\n', "at most"),
        (b'{"cmd": "stop", "graceful": "yes"}\n', '"graceful" must be a boolean'),
        (b'{"cmd": "status", "verbose": 1}\n', "unknown argument(s) 'verbose'"),
        (b'{"cmd": "message"}\n', 'message needs "payload"'),
        (b'{"cmd": "message", "payload": 1, "worker": 9}\n', "no worker 9"),
        (b'{"cmd": "message", "payload": 1, "worker": "all"}\n', '"worker" must be a whole number'),
        (b"x" * 100 * 1024 + b"\n", f"longer than {MAX_REQUEST_BYTES} bytes"),
        (b"[" * 50_000 + b"\n", "nested too deeply"),
        (b"\xff\xfe\xfd\n", "not valid JSON"),
    ]
    with connect(path) as sock:
        for line, error in bad:
            answer = ask(sock, line)
            assert answer["ok"] is False, (line[:40], answer)
            assert error in answer["error"], (line[:40], answer)
        # The same connection still works, and so does a new one.
        assert ask(sock, b'{"cmd": "status"}\n')["result"]["master"]["pid"] == server.pid
    assert ctl_json(path, "status")["master"]["pid"] == server.pid
    assert server.proc.poll() is None
    assert "Traceback" not in server.log


def test_requests_whole_and_byte_by_byte(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    server = start(server_factory, path, workers=1)
    with connect(path) as sock:
        # Two requests in one write: two answers, in order.
        sock.sendall(b'{"cmd": "nope"}\n{"cmd": "status"}\n')
        reader = sock.makefile("rb")
        assert json.loads(reader.readline())["ok"] is False
        assert json.loads(reader.readline())["result"]["master"]["pid"] == server.pid
        # One request trickled in byte by byte.
        for byte in b'{"cmd": "status"}\n':
            sock.sendall(bytes([byte]))
        assert json.loads(reader.readline())["ok"] is True
        reader.close()


def test_client_gone_mid_request_is_harmless(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    server = start(server_factory, path, workers=1)
    assert ctl_json(path, "status")["master"]["pid"] == server.pid  # first-use allocations done
    fds = server.fd_count()
    for partial in (b"", b'{"cmd": "sta', b"x" * 70_000):
        with connect(path) as sock:
            sock.sendall(partial)
    with connect(path) as sock:
        sock.sendall(b'{"cmd": "status"}\n')
        sock.shutdown(socket.SHUT_RDWR)  # gone before the answer
    assert ctl_json(path, "status")["master"]["pid"] == server.pid
    wait_for(lambda: server.fd_count() == fds, 5, f"master back to {fds} fds")
    assert "Traceback" not in server.log


# Messages


def test_message_reaches_workers(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    start(server_factory, path, workers=3, app="tests.apps.messages:serve")
    done = ctl(path, "message", '{"hello": [1, 2]}')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "message sent to 3 worker(s) (all workers)"
    echoes = _wait_messages(path, lambda ms: {m["worker"] for m in ms} == {0, 1, 2})
    for m in echoes:
        assert m["payload"] == {"echo": {"hello": [1, 2]}, "worker": m["worker"]}

    assert ctl_json(path, "message", "--worker", "1", '"just you"') == {"sent": 1}
    last = _wait_messages(path, lambda ms: any(m["payload"]["echo"] == "just you" for m in ms))
    assert [m["worker"] for m in last if m["payload"]["echo"] == "just you"] == [1]

    done = ctl(path, "message", "--worker", "7", "1")
    assert done.returncode == 1 and "no worker 7" in done.stderr
    done = ctl(path, "message", "{not json")
    assert done.returncode == 1 and "not valid JSON" in done.stderr


def _wait_messages(path: Path, done: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Poll ``messages`` until ``done(messages)``: no event reaches outside the master."""
    deadline = time.monotonic() + timeout
    with connect(path) as sock:
        while True:
            messages: list[dict[str, Any]] = ask(sock, b'{"cmd": "messages"}\n')["result"]
            if done(messages):
                return messages
            if time.monotonic() > deadline:
                raise TimeoutError(f"messages so far: {messages}")
            time.sleep(0.05)


# Stopping


@pytest.mark.parametrize("fast", [False, True], ids=["graceful", "fast"])
def test_stop_ends_master(server_factory: type[Server], tmp_path: Path, fast: bool) -> None:
    path = tmp_path / "ctl.sock"
    server = start(server_factory, path, workers=2)
    done = ctl(path, "stop", *(["--fast"] if fast else []))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"master is stopping ({'fast' if fast else 'graceful'})"
    assert server.wait(timeout=15) == 0
    assert not path.exists()
    assert "Traceback" not in server.log
    done = ctl(path, "status")
    assert done.returncode == 1 and "cannot connect" in done.stderr


# Finding the socket


def test_client_finds_the_only_running_master(server_factory: type[Server], tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    directory = tmp_path / "dispatcher"
    done = ctl(None, "status", env=env)
    assert done.returncode == 1
    assert f"no running dispatcher found in {directory}; pass --control PATH" in done.stderr

    directory.mkdir(mode=0o700)
    dead = _stale_socket(directory / "999999999.sock")  # no such process
    reused = _stale_socket(directory / f"{os.getpid()}.sock")  # a live pid, nobody listening
    first = start_at_default_path(server_factory, tmp_path)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert (directory / f"{first.pid}.sock").is_socket()
    assert not dead.exists()  # removed by the master on its way in
    assert reused.exists()  # not the master's to judge: its pid lives
    done = ctl(None, "--json", "status", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["master"]["pid"] == first.pid

    second = start_at_default_path(server_factory, tmp_path)
    done = ctl(None, "status", env=env)
    assert done.returncode == 1
    assert "several dispatchers are running" in done.stderr
    assert f"{first.pid}.sock" in done.stderr and f"{second.pid}.sock" in done.stderr


def _stale_socket(path: Path) -> Path:
    """Leave a socket file at ``path`` that nobody listens on, as a killed master does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    return path


def test_client_refuses_an_open_runtime_dir(tmp_path: Path) -> None:
    (tmp_path / "dispatcher").mkdir(mode=0o755)
    (tmp_path / "dispatcher").chmod(0o755)
    done = ctl(None, "status", env={"XDG_RUNTIME_DIR": str(tmp_path)})
    assert done.returncode == 1
    assert "has mode 0755, open to group or others; refusing to use it" in done.stderr


def test_stale_socket_is_replaced(server_factory: type[Server], tmp_path: Path) -> None:
    path = _stale_socket(tmp_path / "ctl.sock")
    server = start(server_factory, path, workers=1)
    assert f"removed stale control socket {path}" in server.log
    assert ctl_json(path, "status")["master"]["pid"] == server.pid


# The server's file handling, in process (no workers needed)


class _NoMaster:
    """Just what ``ControlServer.start`` and ``close`` touch."""

    message_handlers: list[Any]

    def __init__(self) -> None:
        self.message_handlers = []


def _server(path: Path) -> ControlServer:
    return ControlServer(_NoMaster(), str(path))  # type: ignore[arg-type]


def test_start_refuses_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    path.write_text("precious\n")
    with pytest.raises(ControlError, match="is not a socket; refusing to replace it"):
        asyncio.run(_server(path).start())
    assert path.read_text() == "precious\n"


def test_start_refuses_a_live_socket_and_close_leaves_others_alone(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ctl.sock"

    async def main() -> None:
        first = _server(path)
        await first.start()
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        with pytest.raises(ControlError, match="in use by a running process"):
            await _server(path).start()
        # Someone replaced the file: close must not remove theirs.
        path.unlink()
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(str(path))
        first.close()
        assert path.is_socket()
        other.close()

    asyncio.run(main())


# The framing, sans IO


def test_line_reader_whole_and_byte_by_byte() -> None:
    stream = b'{"cmd": "a"}\n{"cmd": "b"}\n{"cm'
    assert LineReader(100).feed(stream) == [b'{"cmd": "a"}', b'{"cmd": "b"}']
    reader = LineReader(100)
    events = [e for byte in stream for e in reader.feed(bytes([byte]))]
    assert events == [b'{"cmd": "a"}', b'{"cmd": "b"}']
    assert reader.partial


def test_line_reader_skips_a_long_line_and_recovers() -> None:
    reader = LineReader(10)
    assert reader.feed(b"x" * 11) == [TooLong(10)]
    assert reader.feed(b"x" * 1000) == []
    assert reader.feed(b"xx\nok\n") == [b"ok"]
    assert reader.feed(b"0123456789\n01234567890\nend\n") == [b"0123456789", TooLong(10), b"end"]
    assert not reader.partial


def slow_to_boot(server_factory: type[Server], path: Path, workers: int, seconds: float) -> Server:
    """A master whose app takes ``seconds`` to import, once its control socket is there (not started)."""
    server = server_factory("--app", "tests.apps.slowboot:handler", "--control", str(path), workers=workers,
                            env={"SLOWBOOT_SECONDS": str(seconds)})
    wait_for(path.exists, 15, "no control socket")
    return server


def test_ready_waits_for_every_worker_then_answers_the_status(server_factory: type[Server],
                                                               tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    # The app takes a second to import: the answer must wait for both workers, not the socket.
    server = slow_to_boot(server_factory, path, workers=2, seconds=1)
    started = time.monotonic()
    done = ctl(path, "--timeout", "20", "--json", "ready")
    assert done.returncode == 0, done.stderr
    snapshot = json.loads(done.stdout)
    assert [w["state"] for w in snapshot["workers"]] == ["ready", "ready"]
    assert time.monotonic() - started > 0.5  # it did wait for the imports
    pids = {w["pid"] for w in snapshot["workers"]}
    assert pids == {c.pid for c in psutil.Process(server.pid).children()}
    address = snapshot["master"]["listening"][0]
    done = ctl(path, "ready")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"2 worker(s) ready, listening on {address}"


def test_ready_says_how_many_are_ready_when_time_runs_out(server_factory: type[Server],
                                                           tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    slow_to_boot(server_factory, path, workers=1, seconds=30)
    done = ctl(path, "--timeout", "0.5", "ready")
    assert done.returncode == 1
    assert "ready: 0 of 1 worker(s) ready after 0.5 s" in done.stderr
    with connect(path) as sock:
        answer = ask(sock, b'{"cmd": "ready", "timeout": "soon"}\n')
    assert answer == {"ok": False, "error": 'ready: "timeout" must be a number of seconds from 0 to 3600'}


def test_ready_answers_at_once_when_the_master_begins_to_stop(server_factory: type[Server],
                                                                tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    server = slow_to_boot(server_factory, path, workers=1, seconds=30)
    waiting = subprocess.Popen([sys.executable, "-m", "dispatcher.ctl", "--control", str(path),
                                "--timeout", "60", "ready"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        with connect(path) as sock:  # the master is taking requests, ready's among them
            assert ask(sock, b'{"cmd": "status"}\n')["ok"]
        server.signal(signal.SIGTERM)
        started = time.monotonic()
        _, err = waiting.communicate(timeout=20)
    finally:
        waiting.kill()
        waiting.wait(5)
    assert waiting.returncode == 1 and "ready: the master is stopping" in err
    assert time.monotonic() - started < 10  # not the 60 s it was ready to wait, nor the graceful 30


# Idle connections and the connection cap

IDLE_ANSWER = {"ok": False,
               "error": f"idle timeout: no request within {IDLE_TIMEOUT_S:g} s; closing the connection"}
TOO_MANY = f"the master has too many control connections open ({MAX_CONNECTIONS})"


def test_an_idle_connection_is_told_and_closed_after_the_idle_timeout(server_factory: type[Server],
                                                                       tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    server = start(server_factory, path, workers=1)
    fds = server.fd_count()
    with connect(path) as quiet, connect(path) as partial, connect(path) as served:
        partial.sendall(b'{"cmd": "sta')  # half a request buys no time
        assert ask(served, b'{"cmd": "status"}\n')["ok"]  # its idle time counts from this answer
        answered = time.monotonic()
        assert last_answer(served) == IDLE_ANSWER
        # Not cut early (the master started counting a moment before the answer got here)...
        assert time.monotonic() - answered > IDLE_TIMEOUT_S - 0.2
        # ...nor late, and the others were told the same.
        assert time.monotonic() - answered < IDLE_TIMEOUT_S + 2
        assert last_answer(quiet) == IDLE_ANSWER
        assert last_answer(partial) == IDLE_ANSWER
    wait_for(lambda: server.fd_count() == fds, 5, f"master back to {fds} fds")
    assert "Traceback" not in server.log


def test_a_long_command_is_not_cut_by_the_idle_timeout(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    slow_to_boot(server_factory, path, workers=1, seconds=30)
    wait = IDLE_TIMEOUT_S + 1
    with connect(path) as sock:
        answer = ask(sock, json.dumps({"cmd": "ready", "timeout": wait}).encode() + b"\n")
        assert answer == {"ok": False, "error": f"ready: 0 of 1 worker(s) ready after {wait:g} s"}
        assert ask(sock, b'{"cmd": "status"}\n')["ok"]  # and it goes on as before


def test_idle_connections_make_room_for_the_masters_own_user(server_factory: type[Server],
                                                              tmp_path: Path) -> None:
    """At the cap, the idlest connection is told why and closed, so that ``ctl`` still gets through."""
    path = tmp_path / "ctl.sock"
    server = start(server_factory, path, workers=1)
    extra = 6
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(MAX_CONNECTIONS + extra)]
    try:
        for sock in idle:
            sock.settimeout(IDLE_TIMEOUT_S + 10)
            sock.connect(str(path))
        asked = time.monotonic()
        assert request(str(path), "status", timeout_s=IDLE_TIMEOUT_S)["master"]["pid"] == server.pid
        assert time.monotonic() - asked < IDLE_TIMEOUT_S / 2  # room was made, not waited for
        answers = [last_answer(sock) for sock in idle]
    finally:
        for sock in idle:
            sock.close()
    evicted = {"ok": False, "error": f"closed to make room: {TOO_MANY} and this one was the idlest"}
    # Oldest first: one for each connection past the cap, and one for the status request.
    assert answers[:extra + 1] == [evicted] * (extra + 1)
    assert answers[extra + 1:] == [IDLE_ANSWER] * (MAX_CONNECTIONS - 1)
    assert ctl_json(path, "status")["master"]["pid"] == server.pid
    server.sync_log()
    assert "refused" not in server.log and "Traceback" not in server.log


def test_a_refused_client_is_told_why_and_a_burst_is_logged_once(server_factory: type[Server],
                                                                   tmp_path: Path) -> None:
    """Only when every connection is busy with a command is a new one refused."""
    path = tmp_path / "ctl.sock"
    server = slow_to_boot(server_factory, path, workers=1, seconds=30)
    busy: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS):
            busy.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            busy[-1].settimeout(10)
            busy[-1].connect(str(path))
            # Two requests in one write, read at once: once the status is answered,
            # the master is carrying out the ready (it waits for a worker that boots for 30 s).
            busy[-1].sendall(b'{"cmd": "status"}\n{"cmd": "ready", "timeout": 60}\n')
        for sock in busy:
            assert read_answer(sock)["ok"]
        refusal = {"ok": False, "error": f"{TOO_MANY}, every one busy with a command; try again later"}
        for _ in range(5):
            with connect(path) as sock:
                sock.sendall(b'{"cmd": "status"}\n')
                assert last_answer(sock) == refusal
        done = ctl(path, "status")
        assert done.returncode == 1
        assert done.stderr == f"dispatcher ctl: {refusal['error']}\n"
        # One line when the refusals begin, one once they have stopped for a while.
        summary = server.wait_line(r"WARNING refused (\d+) control connection\(s\)", timeout=15)
        assert summary.group(1) == "6"
        server.sync_log()
        assert server.log.count("control connection refused") == 1, server.log
    finally:
        for sock in busy:
            sock.close()


def test_every_ctl_command_the_readme_shows_parses() -> None:
    import shlex

    from dispatcher.ctl import build_parser

    shown = [shlex.split(line.split(" # ")[0])[4:] for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith("python -m dispatcher ctl ")]
    assert len(shown) == 7
    for args in shown:
        # "[--fast]" is the README's way of saying the flag is optional: try it both ways.
        plain = [a for a in args if a != "[--fast]"]
        for variant in ([plain, [*plain, "--fast"]] if "[--fast]" in args else [plain]):
            build_parser().parse_args(variant)  # a command that does not parse exits here
