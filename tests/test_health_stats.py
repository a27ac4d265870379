"""Health pings and per-worker stats, seen through the control socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from bench.load import ask, read_all
from bench.server import Server
from dispatcher.ctl import request


def poll(path: Path, check: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Status until ``check(status)`` holds: worker counters arrive with pongs, no event says when."""
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = request(str(path), "status")
        if check(status):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"status never matched; last: {json.dumps(status, indent=1)}")
        time.sleep(0.05)


def test_blocked_event_loop_gets_worker_replaced(server_factory: type[Server], tmp_path: Path) -> None:
    server = server_factory(
        "--app", "tests.apps.handlers:block", "--ping-interval", "0.2", "--ping-timeout", "1",
        "--control", str(tmp_path / "c.sock"), workers=2,
    ).start()
    blocker = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    blocker.sendall(b"block 30\n")
    match = server.wait_line(r"worker (\d) \(pid (\d+)\) is unresponsive: no pong for ([\d.]+) s",
                             timeout=1 + 0.2 + 2 + 1)
    blocked_pid = int(match.group(2))
    assert float(match.group(3)) >= 1.0
    started = time.monotonic()
    # Queued behind the blocked worker or not, every connection is answered by a live one.
    answers = [ask(server.port, b"ok\n").split()[1] for _ in range(4)]
    assert str(blocked_pid) not in answers
    server.wait_line(rf"pid {blocked_pid}\) killed by SIG(TERM|KILL)", timeout=5)
    assert time.monotonic() - started < 5
    blocker.close()


def test_connection_behind_blocked_worker_is_served_elsewhere(
    server_factory: type[Server], tmp_path: Path
) -> None:
    server = server_factory(
        "--app", "tests.apps.handlers:block", "--ping-interval", "0.2", "--ping-timeout", "1",
        "--control", str(tmp_path / "c.sock"), workers=2,
    ).start()
    first = ask(server.port, b"ok\n").split()[1]  # the other worker is next in line
    second = ask(server.port, b"ok\n").split()[1]
    assert first != second
    blocker = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    blocker.sendall(b"block 30\n")  # goes to `first`, which acks, then blocks its loop
    poll(tmp_path / "c.sock", lambda s: s["master"]["in_flight"] == 0 and s["master"]["accepted"] == 3)
    started = time.monotonic()
    behind = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    behind.sendall(b"ok\n")  # goes to `second` ...
    third = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    third.sendall(b"ok\n")  # ... and this one to `first`, blocked: un-acked until it dies
    answers = {read_all(behind).split()[1], read_all(third).split()[1]}
    assert first not in answers
    assert time.monotonic() - started < 1 + 0.2 + 2
    server.wait_line(r"1 un-acked connection\(s\) re-dispatched")
    for sock in (blocker, behind, third):
        sock.close()


def test_stats_add_up(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    server = server_factory(
        "--app", "tests.apps.handlers:hold", "--ping-interval", "0.1", "--control", str(path),
        workers=2,
    ).start()
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.recv(100)
    status = poll(path, lambda s: sum(w["handled"] for w in s["workers"]) == 10)
    assert sum(w["handed_off"] for w in status["workers"]) == 10
    assert sum(w["acked"] for w in status["workers"]) == 10
    assert status["master"]["accepted"] == 10

    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
    for sock in held:
        sock.recv(100)
    poll(path, lambda s: sum(w["active"] for w in s["workers"]) == 4)
    for sock in held:
        sock.close()
    status = poll(path, lambda s: sum(w["active"] for w in s["workers"]) == 0)

    for worker in status["workers"]:
        assert worker["state"] == "ready" and worker["pid"] in server.worker_pids()
        assert 5 * 2**20 < worker["rss_bytes"] < 2 * 2**30
        assert 0 < worker["uss_bytes"] <= worker["rss_bytes"]
        assert 3 <= worker["open_fds"] < 100
        assert worker["ping_rtt_ms"] is not None and 0 < worker["ping_rtt_ms"] < 1000
        assert worker["loop_lag_ms"] is not None and worker["loop_lag_ms"] >= 0
        assert worker["uptime_s"] > 0
    master = status["master"]
    assert master["pid"] == server.pid and master["pending"] == 0
    assert 5 * 2**20 < master["rss_bytes"] < 2 * 2**30 and 3 <= master["open_fds"] < 200


def test_counters_survive_restart(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    server = server_factory("--app", "tests.apps.handlers:pid", "--ping-interval", "0.1",
                            "--control", str(path), workers=1).start()
    for _ in range(5):
        ask(server.port)
    poll(path, lambda s: s["workers"][0]["handled"] == 5)
    (pid,) = server.worker_pids()
    os.kill(pid, signal.SIGKILL)
    server.wait_line(r"worker 0 \(pid \d+\) ready")
    ask(server.port)
    status = poll(path, lambda s: s["workers"][0]["handled"] == 6)
    worker = status["workers"][0]
    assert worker["handed_off"] == 6 and worker["restarts"] == 1
    assert worker["last_exit"] == "killed by SIGKILL"


def test_handoff_waits_for_a_channel_full_of_messages(server_factory: type[Server], tmp_path: Path) -> None:
    """A channel full of unread messages puts the hand-off back in line; nobody is replaced."""
    path = tmp_path / "c.sock"
    server = server_factory("--app", "tests.apps.handlers:pid", "--control", str(path),
                            "--ping-interval", "0", workers=1).start()
    (only,) = server.worker_pids()
    os.kill(only, signal.SIGSTOP)  # it reads nothing: its channel fills up
    try:
        payload = "x" * 60_000
        for _ in range(20):  # 1.2 MB: far more than the socket buffer holds
            assert request(str(path), "message", payload=payload, worker=None)["sent"] == 1
        client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        client.sendall(b"hi\n")
        poll(path, lambda s: s["master"]["accepted"] == 1 and s["master"]["pending"] == 1)
    finally:
        os.kill(only, signal.SIGCONT)
    assert read_all(client).split()[1] == str(only)
    client.close()
    assert "replacing it" not in server.log
