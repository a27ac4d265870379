"""Failure modes found in review: each test pins one of them down."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest

from bench.load import ask
from bench.server import Server
from dispatcher.ctl import CtlError, request
from shared import protocol
from shared.channel import Channel, socketpair
from shared.protocol import Ping, Pong
from tests.helpers import app_env


def test_reload_to_a_custom_server_that_fails_before_serving(server_factory: type[Server],
                                                              tmp_path: Path) -> None:
    app = tmp_path / "customapp.py"
    app.write_text("from tests.apps.handlers import serve\n")
    path = tmp_path / "c.sock"
    server = server_factory("--app", "customapp:serve", "--control", str(path), workers=2,
                            env=app_env(tmp_path)).start()
    before = {w["pid"] for w in request(str(path), "status")["workers"]}
    app.write_text("async def serve(me):\n    raise RuntimeError('cannot reach the database')\n")
    with pytest.raises(CtlError, match=r"reload failed: .*raised RuntimeError: cannot reach the database"):
        request(str(path), "reload", timeout_s=30)
    assert {w["pid"] for w in request(str(path), "status")["workers"]} == before
    assert ask(server.port).split()[2] == "custom"


def test_bad_pong_figures_are_ignored_and_the_slot_restarts(server_factory: type[Server],
                                                           tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    server = server_factory("--app", "tests.apps.evil:handler", "--control", str(path),
                            workers=1).start()
    bad = protocol.encode(Pong(0, {"handled": "x", "active": None, "accepted": 1e300, "acked": True}))
    culprit = int(ask(server.port, f"raw {bad.hex()}\n".encode()))
    os.kill(culprit, signal.SIGKILL)
    server.wait_line(r"worker 0 \(pid \d+\) ready")
    worker = request(str(path), "status")["workers"][0]
    assert worker["pid"] != culprit and worker["state"] == "ready"
    assert isinstance(worker["handled"], int)


def test_connections_do_not_leak_into_a_handlers_children(server_factory: type[Server]) -> None:
    server = server_factory("--app", "tests.apps.handlers:inherit", workers=1).start()
    assert ask(server.port).split()[2] == "False"
    (pid,) = server.worker_pids()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if int(fd) < 3:
            continue  # stdin, stdout, stderr: inherited on purpose
        flags = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0]
        assert int(flags, 8) & os.O_CLOEXEC, f"fd {fd} of the worker is inheritable"


def test_the_same_inherited_fd_twice_is_one_listener(server_factory: type[Server]) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port, fd = listener.getsockname()[1], listener.fileno()
    server = server_factory("--app", "tests.apps.handlers:pid", "--bind", f"fd://{fd}", workers=1,
                            bind=f"fd://{fd}", pass_fds=(fd,)).start()
    listener.close()
    assert server.log.count("listening on") == 1 and server.addresses == [f"127.0.0.1:{port}"]
    assert ask(port).split()[0] == "0"
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


def test_slow_import_is_not_a_ping_timeout(server_factory: type[Server]) -> None:
    server = server_factory("--app", "tests.apps.slowboot:handler", "--ping-interval", "0.2",
                            "--ping-timeout", "1", workers=1, env={"SLOWBOOT_SECONDS": "2"})
    server.start()
    assert "unresponsive" not in server.log
    assert ask(server.port).split()[0] == "0"


def test_boot_timeout_stops_a_master_whose_workers_never_get_ready(server_factory: type[Server]) -> None:
    server = server_factory("--app", "tests.apps.slowboot:handler", "--boot-timeout", "1",
                            workers=1, env={"SLOWBOOT_SECONDS": "30"})
    assert server.wait(timeout=10) == 3
    assert "not ready after" in server.log and "(boot timeout 1 s); killing it" in server.log


def test_replaced_worker_gets_the_graceful_timeout_and_no_more(server_factory: type[Server],
                                                              tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    server = server_factory("--app", "tests.apps.handlers:hold", "--control", str(path),
                            "--graceful-timeout", "1", workers=1).start()
    held = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    old = int(held.recv(100).split()[1])
    assert request(str(path), "reload", timeout_s=30) == {"reloaded": 1}
    server.wait_line(rf"pid {old}\) still draining after the graceful timeout \(1 s\); killing it")
    server.wait_line(rf"pid {old}\) killed by SIGKILL")
    held.close()


def test_acks_a_dead_worker_sent_after_a_bad_frame_still_count() -> None:
    loop = asyncio.new_event_loop()
    a, b = socketpair()
    acks: list[tuple[tuple[int, ...], bool, int]] = []
    closed: list[str] = []
    channel = Channel(a, loop, lambda m, fds: None, closed.append,
                      on_ack=lambda c, ok, load: acks.append((c, ok, load)))
    b.send(b"\xff bad")
    for conn_id in (1, 2, 3):
        b.send(protocol.encode_ack((conn_id,), True))
    b.send(protocol.encode(Ping(9)))
    b.close()
    channel._on_readable()  # the bad frame: the channel fails
    assert closed and "protocol error" in closed[0]
    channel.read_acks_of_dead_peer()
    assert acks == [((1,), True, 0), ((2,), True, 0), ((3,), True, 0)]
    channel.close()
    loop.close()
