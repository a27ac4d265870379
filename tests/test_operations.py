"""Operating under load: rolling reload, scaling, recycling, stopping, inherited sockets, users."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from bench.load import Load, ask
from bench.server import Server
from dispatcher.ctl import CtlError, request
from tests.helpers import app_env, wait_for

APP = "tests.apps.handlers:pid"


def status(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = request(str(path), "status")
    return result


def pids(path: Path) -> set[int]:
    return {w["pid"] for w in status(path)["workers"]}


def test_rolling_reload_under_load_loses_nothing(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    server = server_factory("--app", APP, "--control", str(path), workers=4).start()
    with Load(server.port, clients=4, max_seconds=60) as load:
        load.wait_requests(200)
        for _ in range(3):
            before = pids(path)
            started = time.monotonic()
            assert request(str(path), "reload", timeout_s=60) == {"reloaded": 4}
            took = time.monotonic() - started
            after = pids(path)
            assert len(after) == 4 and not before & after, (before, after)
            load.wait_requests(100)
    assert load.failed == 0, load.errors
    assert took < 30
    assert server.log.count("reload: 4 worker(s) replaced") == 3


def test_sighup_reloads(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    server = server_factory("--app", APP, "--control", str(path), workers=2).start()
    before = pids(path)
    server.signal(signal.SIGHUP)
    server.wait_line(r"reload: 2 worker\(s\) replaced")
    assert not before & pids(path)


def test_reload_of_a_broken_app_keeps_old_workers(server_factory: type[Server], tmp_path: Path) -> None:
    app = tmp_path / "reloadme.py"
    app.write_text("from tests.apps.handlers import pid as handler\n")
    path = tmp_path / "c.sock"
    server = server_factory("--app", "reloadme:handler", "--control", str(path), workers=2,
                            env=app_env(tmp_path)).start()
    before = pids(path)
    app.write_text("raise RuntimeError('the new release is broken')\n")
    with Load(server.port, clients=2, max_seconds=30) as load:
        load.wait_requests(50)
        broken = r"reload failed: worker 0 failed to boot: .*the new release is broken"
        with pytest.raises(CtlError, match=broken):
            request(str(path), "reload", timeout_s=30)
        load.wait_requests(50)
    assert load.failed == 0, load.errors
    assert pids(path) == before
    assert set(load.answers) == {str(p) for p in before}
    assert "the old one keeps serving" in server.log
    assert server.proc.poll() is None


def test_scale_up_and_down_under_load(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    server = server_factory("--app", APP, "--control", str(path), workers=2).start()
    with Load(server.port, clients=4, max_seconds=60) as load:
        load.wait_requests(100)
        assert request(str(path), "scale", workers=6)["added"] == 4
        wait_for(lambda: sum(w["state"] == "ready" for w in status(path)["workers"]) == 6, 15, "6 ready")
        load.wait_requests(200)
        assert request(str(path), "scale", workers=1)["removed"] == 5
        wait_for(lambda: len(server.worker_pids()) == 1, 15, "the removed workers exited")
        load.wait_requests(100)
    assert load.failed == 0, load.errors
    assert [w["id"] for w in status(path)["workers"]] == [0]


def test_ttin_ttou_add_and_remove_a_worker(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    server = server_factory("--app", APP, "--control", str(path), workers=1).start()
    server.signal(signal.SIGTTIN)
    server.wait_line(r"worker 1 \(pid \d+\) ready")
    assert len(status(path)["workers"]) == 2
    server.signal(signal.SIGTTOU)
    server.wait_line(r"worker 1 removed")
    server.signal(signal.SIGTTOU)  # never below one
    server.signal(signal.SIGTTIN)
    server.wait_line(r"worker 1 \(pid \d+\) ready")
    assert [w["id"] for w in status(path)["workers"]] == [0, 1]


def test_max_requests_recycles_around_the_limit(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    server = server_factory("--app", APP, "--control", str(path), "--max-requests", "50",
                            "--max-requests-jitter", "10", workers=2).start()
    with Load(server.port, clients=4, max_seconds=60) as load:
        for _ in range(6):  # each worker recycled three times, the new ones too
            server.wait_line(r"ready, replacing pid \d+ \(served", timeout=20)
    assert load.failed == 0, load.errors
    recycled = re.findall(r"served (\d+) connections \(max-requests (\d+)\); replacing it", server.log)
    assert len(recycled) >= 6
    for served, limit in recycled:
        assert 50 <= int(limit) <= 60
        assert int(limit) <= int(served) <= int(limit) + 8
    assert len(load.answers) >= 6  # many worker pids served over the run


def test_max_memory_recycles_a_leaking_worker(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    server = server_factory("--app", "tests.apps.handlers:hog", "--control", str(path),
                            "--max-memory", "150M", "--ping-interval", "0.2", workers=1).start()
    leaky = int(ask(server.port, b"hog 200\n").split()[1])
    server.wait_line(rf"pid {leaky}\) uses [\d.]+ MiB \(max-memory 150.0 MiB\); replacing it")
    server.wait_line(rf"ready, replacing pid {leaky}")
    assert int(ask(server.port, b"hog 0\n").split()[1]) != leaky
    server.wait_line(rf"pid {leaky}\) exited with code 0")


def test_sigquit_stops_fast(server_factory: type[Server]) -> None:
    server = server_factory("--app", "tests.apps.handlers:slow", workers=2).start()
    client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    client.sendall(b"sleep 30\n")
    wait_for(lambda: _busy(server), 5, "request in flight")
    started = time.monotonic()
    server.signal(signal.SIGQUIT)
    assert server.wait(timeout=10) == 0
    assert time.monotonic() - started < 2.5
    client.close()


def test_second_sigint_escalates_to_fast(server_factory: type[Server]) -> None:
    server = server_factory("--app", "tests.apps.handlers:slow", workers=2).start()
    client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    client.sendall(b"sleep 30\n")
    wait_for(lambda: _busy(server), 5, "request in flight")
    server.signal(signal.SIGINT)
    server.wait_line("SIGINT: stopping gracefully")
    started = time.monotonic()
    server.signal(signal.SIGINT)
    server.wait_line("SIGINT again: stopping fast")
    assert server.wait(timeout=10) == 0
    assert time.monotonic() - started < 2.5
    client.close()


def _busy(server: Server) -> bool:
    for pid in server.worker_pids():
        try:
            if any(c.status == "ESTABLISHED" for c in psutil.Process(pid).net_connections("tcp")):
                return True
        except psutil.Error:
            pass
    return False


def test_systemd_socket_activation(server_factory: type[Server]) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    fd = listener.fileno()
    # As systemd does: the socket as fd 3, LISTEN_FDS=1, LISTEN_PID = the server's own pid.
    launcher = [sys.executable, "-c", (
        f"import os, sys; os.dup2({fd}, 3); os.close({fd}); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
        "os.execv(sys.executable, [sys.executable, '-m', 'dispatcher', *sys.argv[1:]])"
    )]
    server = server_factory("--app", APP, workers=2, bind=None, launcher=launcher, pass_fds=(fd,))
    server.start()
    listener.close()  # only the server holds it now
    assert server.address == f"127.0.0.1:{port}"
    assert {ask(port).split()[1] for _ in range(4)} == {str(p) for p in server.worker_pids()}
    for pid in server.worker_pids():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not any(v.startswith(b"LISTEN_") for v in environ)


def test_bind_fd_adopts_a_listening_socket(server_factory: type[Server]) -> None:
    listener = socket.socket(socket.AF_INET6)
    listener.bind(("::1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    server = server_factory("--app", APP, workers=1, bind=f"fd://{listener.fileno()}",
                            pass_fds=(listener.fileno(),)).start()
    listener.close()
    assert ask(port, host="::1").split()[0] == "0"
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


@pytest.fixture
def public_app_dir() -> Iterator[Path]:
    """A world-readable folder with an app in it: the checkout may sit in a 0700 folder."""
    folder = Path(tempfile.mkdtemp(prefix="dispatcher-public-"))
    folder.chmod(0o755)
    (folder / "whoami.py").write_text(
        "import os\n\n\n"
        "async def handler(reader, writer):\n"
        "    await reader.readline()\n"
        "    writer.write(f'{os.getuid()} {os.getpid()}\\n'.encode())\n"
        "    await writer.drain()\n"
    )
    (folder / "whoami.py").chmod(0o644)
    yield folder
    shutil.rmtree(folder)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_workers_run_as_nobody(server_factory: type[Server], public_app_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    server = server_factory("--app", "whoami:handler", "--user", "nobody", workers=2,
                            env={"PYTHONPATH": str(public_app_dir)}).start()
    for pid in server.worker_pids():
        process = psutil.Process(pid)
        assert process.uids().real == process.uids().effective == nobody.pw_uid
        assert process.gids().real == process.gids().effective == nobody.pw_gid
    assert psutil.Process(server.pid).uids().real == 0
    answers = [ask(server.port).split() for _ in range(4)]
    assert {a[0] for a in answers} == {str(nobody.pw_uid)}
    assert {a[1] for a in answers} == {str(p) for p in server.worker_pids()}


def test_unknown_user_is_a_usage_error(server_factory: type[Server]) -> None:
    server = server_factory("--app", APP, "--user", "no-such-user-xyz", workers=1)
    assert server.wait(timeout=10) == 2
    assert "--user: no user 'no-such-user-xyz'" in server.log
