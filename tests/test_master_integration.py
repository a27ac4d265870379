"""The master as a whole: policies, handler kinds, app errors, stopping, binds."""

from __future__ import annotations

import collections
import http.client
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench.load import ask, read_all
from bench.server import ROOT, Server
from tests.helpers import wait_for

APP = "tests.apps.handlers:pid"


@pytest.mark.parametrize("policy", ["shared", "reuseport"])
def test_workers_accept_themselves_under_policy(server_factory: type[Server], policy: str) -> None:
    server = server_factory("--app", APP, "--policy", policy, workers=2).start()
    pids = set(server.worker_pids())
    answers = [ask(server.port) for _ in range(30)]
    assert {a.split()[1] for a in answers} <= {str(p) for p in pids}
    # Only the workers listen; the master accepts nothing.
    master_listening = [c for c in psutil.Process(server.pid).net_connections("tcp")
                        if c.status == "LISTEN"]
    assert master_listening == [] if policy == "reuseport" else len(master_listening) == 1
    listening = collections.Counter(
        pid for pid in pids for c in psutil.Process(pid).net_connections("tcp")
        if c.status == "LISTEN" and c.laddr.port == server.port
    )
    assert set(listening) == pids


def test_blocking_handler_runs_on_threads(server_factory: type[Server]) -> None:
    server = server_factory("--app", "tests.apps.handlers:blocking", "--threads", "2",
                            workers=2).start()
    answers = collections.Counter(ask(server.port).split()[1] for _ in range(10))
    assert sorted(answers.values()) == [5, 5]


def test_custom_server_iterates_connections(server_factory: type[Server]) -> None:
    server = server_factory("--app", "tests.apps.handlers:serve", workers=2).start()
    answers = [ask(server.port).split() for _ in range(4)]
    assert all(a[2] == "custom" for a in answers)
    assert len({a[1] for a in answers}) == 2


def test_example_app_speaks_http(server_factory: type[Server]) -> None:
    server = server_factory("--app", "examples.hello:handler", workers=2).start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        bodies = []
        for _ in range(3):  # keep-alive: three requests on one connection
            conn.request("GET", "/")
            response = conn.getresponse()
            assert response.status == 200
            bodies.append(response.read().decode())
        assert len(set(bodies)) == 1 and bodies[0].startswith("hello from pid ")
    finally:
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/", headers={"Connection": "close"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("connection") == "close"
    conn.close()


#: ``struct tcp_info``'s ``tcpi_data_segs_in`` (Linux 4.6+): the segments received that carried data.
_DATA_SEGS_IN = struct.Struct("I")
_DATA_SEGS_IN_OFFSET = 152


def _data_segments_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    return int(_DATA_SEGS_IN.unpack_from(info, _DATA_SEGS_IN_OFFSET)[0])


def test_example_app_writes_each_answer_at_once(server_factory: type[Server]) -> None:
    # Head and body written one by one went out as two segments (and two system calls): on loopback,
    # one write is one segment, so the client's count of data segments says how the worker wrote.
    server = server_factory("--app", "examples.hello:handler", workers=1).start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.connect()
        assert conn.sock is not None
        for _ in range(3):  # keep-alive: three answers on one connection
            before = _data_segments_in(conn.sock)
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200 and body.startswith(b"hello from pid ")
            assert _data_segments_in(conn.sock) - before == 1
    finally:
        conn.close()


SPEC_ERRORS = [
    ("tests.apps.handlers", 2, "has no colon"),
    ("no_such_module_xyz:handler", 4, "module 'no_such_module_xyz' not found"),
    ("tests.apps.handlers:missing", 4, "has no attribute 'missing'"),
    ("tests.apps.handlers:not_callable", 4, "int object is not callable"),
    ("tests.apps.handlers:wrong_signature", 4, "wrong signature wrong_signature(only_one)"),
    ("tests.apps.broken:handler", 4, "raised RuntimeError: this module is broken on purpose"),
]


@pytest.mark.parametrize(("spec", "code", "message"), SPEC_ERRORS)
def test_app_spec_error_stops_master_with_clear_line(
    server_factory: type[Server], spec: str, code: int, message: str
) -> None:
    started = time.monotonic()
    server = server_factory("--app", spec, workers=2)
    assert server.wait(timeout=5) == code
    assert time.monotonic() - started < 5
    error_lines = [line for line in server.lines if message in line]
    assert len(error_lines) == 1, server.log
    assert spec in error_lines[0]
    assert "Traceback" not in server.log


def test_graceful_stop_lets_slow_request_finish(server_factory: type[Server]) -> None:
    server = server_factory("--app", "tests.apps.handlers:slow", workers=2).start()
    client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    client.sendall(b"sleep 1.5\n")
    wait_for(lambda: any(_established(pid) for pid in server.worker_pids()), 5, "request in flight")
    server.signal(signal.SIGTERM)
    server.wait_line("SIGTERM: stopping gracefully")
    # Its listeners are closed now; it still says where it was listening.
    master = server.status()["master"]
    assert master["stopping"] is True and master["listening"] == [server.address]
    answer = read_all(client)
    client.close()
    assert answer.split()[0] in {"0", "1"}
    assert server.wait(timeout=10) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def test_graceful_stop_kills_after_timeout(server_factory: type[Server]) -> None:
    server = server_factory("--app", "tests.apps.handlers:slow", "--graceful-timeout", "0.5",
                            workers=1).start()
    client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    client.sendall(b"sleep 30\n")
    wait_for(lambda: any(_established(pid) for pid in server.worker_pids()), 5, "request in flight")
    started = time.monotonic()
    server.signal(signal.SIGINT)
    assert server.wait(timeout=10) == 0
    assert time.monotonic() - started < 5
    assert "still running after the graceful timeout; killing it" in server.log
    client.close()


def _established(pid: int) -> bool:
    try:
        return any(c.status == "ESTABLISHED" for c in psutil.Process(pid).net_connections("tcp"))
    except psutil.Error:
        return False


@pytest.mark.parametrize("with_prctl", [True, False], ids=["pdeathsig", "channel-eof"])
def test_workers_die_with_master_sigkill(
    server_factory: type[Server], tmp_path: Path, with_prctl: bool
) -> None:
    env = {}
    if with_prctl:
        pytest.importorskip("prctl")
    else:
        # A module that fails to import shadows python-prctl, as if it were not installed.
        (tmp_path / "prctl.py").write_text("raise ImportError('hidden by the test')\n")
        env["PYTHONPATH"] = f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"
    server = server_factory("--app", APP, workers=3, env=env).start()
    assert server.log.count("python-prctl is not installed") == (0 if with_prctl else 1)
    workers = server.worker_pids()
    assert len(workers) == 3
    server.signal(signal.SIGKILL)
    server.wait(timeout=5)
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                             for p in workers), 2, "workers still alive 2 s after the master died")


def test_worker_process_title(server_factory: type[Server]) -> None:
    pytest.importorskip("prctl")
    server = server_factory("--app", APP, workers=1).start()
    (pid,) = server.worker_pids()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert cmdline.startswith(f"dispatcher: worker 0 {APP}")


def test_crashed_worker_is_restarted(server_factory: type[Server]) -> None:
    server = server_factory("--app", APP, workers=1).start()
    (first,) = server.worker_pids()
    os.kill(first, signal.SIGKILL)
    server.wait_line(r"worker 0 restarts at once \(killed from outside\)")
    server.wait_line(r"worker 0 \(pid \d+\) ready")
    assert ask(server.port).split()[1] != str(first)


def test_unix_and_ipv6_binds(server_factory: type[Server], tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    server = server_factory("--app", APP, "--bind", "[::1]:0", "--bind", f"unix:{path}",
                            workers=1, bind=None).start()
    ipv6_port = int(server.address.rsplit(":", 1)[1])
    assert server.addresses == [server.address, f"unix:{path}"]
    assert f"listening on unix:{path}" in server.log
    assert ask(ipv6_port, host="::1").split()[0] == "0"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"hi\n")
        assert read_all(sock).split()[0] == "0"
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert not path.exists()


def test_web_concurrency_sets_worker_count(server_factory: type[Server]) -> None:
    server = server_factory("--app", APP, workers=0, env={"WEB_CONCURRENCY": "3"}).start()
    assert "3 worker(s)" in server.log
    assert len(server.ready_snapshot["workers"]) == 3


def test_bind_error_is_one_clear_line(server_factory: type[Server]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = server_factory("--app", APP, workers=1, bind=f"127.0.0.1:{port}")
        assert server.wait(timeout=10) == 1
    assert f"bind '127.0.0.1:{port}': Address already in use" in server.log


def test_help_explains_options() -> None:
    import subprocess

    out = subprocess.run([sys.executable, "-m", "dispatcher", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    for option in ("--app", "--bind", "--workers", "--policy", "--window", "--max-pending",
                   "--graceful-timeout", "--threads", "WEB_CONCURRENCY", "exit codes"):
        assert option in out


def test_json_log_lines_name_master_or_worker(server_factory: type[Server]) -> None:
    import json

    server = server_factory("--app", APP, "--log-format", "json", workers=2)
    server.wait_line(r'"message": "worker 1 \(pid \d+\) ready"')
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    entries = [json.loads(line) for line in server.lines]
    assert {e["role"] for e in entries} == {"master", "worker"}
    assert all(isinstance(e["pid"], int) for e in entries)
    drained = [e for e in entries if e["role"] == "worker" and "draining" in e["message"]]
    assert sorted(e["worker"] for e in drained) == [0, 1]
    assert len({e["pid"] for e in drained}) == 2


def test_example_answers_a_new_connections_first_request_while_draining(
    server_factory: type[Server],
) -> None:
    server = server_factory("--app", "examples.hello:handler", workers=1).start()
    (pid,) = server.worker_pids()
    fresh = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    kept = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    kept.request("GET", "/")
    assert kept.getresponse().read()
    wait_for(lambda: sum(c.status == "ESTABLISHED" for c in psutil.Process(pid).net_connections("tcp"))
             == 2, 5, "both connections handed to the worker")
    os.kill(pid, signal.SIGTERM)
    server.wait_line(r"\[worker 0\] INFO draining")
    fresh.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = read_all(fresh)
    assert answer.startswith("HTTP/1.1 200") and "connection: close" in answer.lower()
    # The idle kept-alive connection was closed by the draining worker, without an answer.
    kept.sock.settimeout(10)
    assert kept.sock.recv(100) == b""
    fresh.close()
    kept.close()
