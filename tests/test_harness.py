"""The server harness (``bench.server``): readiness, addresses and pids from the control socket."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import psutil
import pytest

from bench.load import ask
from bench.server import Server, StartError
from tests.helpers import wait_for

APP = "tests.apps.handlers:pid"
SLOWBOOT = "tests.apps.slowboot:handler"


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_start_needs_no_log_line(server_factory: type[Server]) -> None:
    # Warnings only: no "listening on", no "ready" line to go by. The app takes a
    # second to import, so the workers are not ready when the socket is up.
    server = server_factory("--app", SLOWBOOT, "--log-level", "warning", workers=2,
                            env={"SLOWBOOT_SECONDS": "1"}).start()
    assert "listening on" not in server.log and "ready" not in server.log
    workers = server.ready_snapshot["workers"]
    assert [w["state"] for w in workers] == ["ready", "ready"]
    assert sorted(w["pid"] for w in workers) == sorted(server.worker_pids())
    assert server.addresses == [server.address] == [f"127.0.0.1:{server.port}"]
    assert int(ask(server.port).split()[1]) in {w["pid"] for w in workers}


def test_start_waits_for_the_successor_of_a_worker_killed_before_it_was_ready(
    server_factory: type[Server],
) -> None:
    server = server_factory("--app", SLOWBOOT, workers=1, env={"SLOWBOOT_SECONDS": "1"})
    wait_for(lambda: server.worker_pids(), 10, "no worker started")
    (first,) = server.worker_pids()
    os.kill(first, signal.SIGKILL)
    server.start()
    (worker,) = server.ready_snapshot["workers"]
    assert worker["pid"] != first and worker["state"] == "ready" and worker["restarts"] == 1
    assert int(ask(server.port).split()[1]) == worker["pid"]


def test_a_server_that_exits_before_it_is_ready_raises_with_its_log(server_factory: type[Server]) -> None:
    server = server_factory("--app", "tests.apps.broken:handler", workers=1)
    with pytest.raises(StartError, match=r"(?s)exited with code 4.*this module is broken on purpose"):
        server.start()


def test_not_ready_in_time_is_a_start_error(server_factory: type[Server]) -> None:
    server = server_factory("--app", SLOWBOOT, workers=1, env={"SLOWBOOT_SECONDS": "30"})
    with pytest.raises(StartError, match=r"ready: 0 of 1 worker\(s\) ready after"):
        server.start(timeout=2)
    assert server.proc.poll() is None  # still booting: the fixture ends it


def test_without_a_control_socket_start_says_so(server_factory: type[Server]) -> None:
    server = server_factory("--app", APP, "--control", "none", workers=1)
    assert server.control_path is None
    with pytest.raises(StartError, match=r"--control none"):
        server.start()


def test_a_named_control_socket_is_used(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "mine.sock"
    server = server_factory("--app", APP, f"--control={path}", workers=1).start()
    assert server.control_path == str(path) and "--control" not in server.command
    assert server.status()["master"]["pid"] == server.pid


def test_the_private_control_socket_is_private_and_removed(server_factory: type[Server]) -> None:
    server = server_factory("--app", APP, workers=1).start()
    assert server.control_path is not None
    folder = Path(server.control_path).parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    server.kill()
    assert not folder.exists()


@pytest.mark.parametrize("graceful", [True, False], ids=["stop", "kill"])
def test_every_process_it_saw_is_ended(server_factory: type[Server], graceful: bool) -> None:
    server = server_factory("--app", APP, workers=2).start()
    (first, _) = server.worker_pids()
    os.kill(first, signal.SIGKILL)  # replaced: the harness saw both pids
    server.wait_line(r"worker \d \(pid \d+\) ready")
    pids = [server.pid, *server.worker_pids(), first]
    # A worker stopped so that it outlives a fast master: only its pid ends it.
    os.kill(pids[1], signal.SIGSTOP)
    if graceful:
        assert server.stop(timeout=2) is not None
    else:
        server.kill()
    wait_for(lambda: all(_gone(pid) for pid in pids), 10, f"left running of {pids}")
