"""Two dispatcher instances behind a real HAProxy: readiness, the drain delay, the PROXY protocol.

Each instance stands for a machine: a master with its workers, its client
listener (held by the test and passed as ``fd://N``, so a restarted
instance listens on the same port and no connection is refused while it is
down) and its admin listener (``--metrics``), which HAProxy polls with
``GET /readyz``. HAProxy sends ``PROXY`` v2 headers; the app answers with
the client address it was given.

Port 0 everywhere the test can read the port back: the listeners, HAProxy's
frontend (an inherited socket too, ``fd@N``). The admin listeners take a
port picked once from the kernel (bind to 0, read, close), since a
restarted instance must come back on the same one for HAProxy's check.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench.server import Server
from tests.helpers import wait_for

HOST = "127.0.0.1"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
DRAIN_DELAY_S = 1.5
TIMEOUT_S = 20.0

pytestmark = pytest.mark.skipif(not os.access(HAPROXY, os.X_OK),
                                reason="haproxy is not installed (make installs it when run as root)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Instance:
    """One dispatcher "machine": its listener (kept open across restarts) and its admin port."""

    name: str
    factory: type[Server]
    listener: socket.socket = field(init=False)
    admin_port: int = field(init=False)
    server: Server | None = None

    def __post_init__(self) -> None:
        self.listener = socket.create_server((HOST, 0), backlog=1024)
        self.listener.set_inheritable(True)
        self.admin_port = free_port()

    @property
    def port(self) -> int:
        port: int = self.listener.getsockname()[1]
        return port

    def start(self) -> Server:
        fd = self.listener.fileno()
        self.server = self.factory(
            "--app", "tests.apps.behind_proxy:app", "--interface", "asgi", "--bind", f"fd://{fd}",
            "--proxy-protocol", "--drain-delay", str(DRAIN_DELAY_S), "--metrics", f"{HOST}:{self.admin_port}",
            "--no-access-log", "--graceful-timeout", "5", workers=2, bind=None, pass_fds=(fd,),
            env={"INSTANCE": self.name},
        ).start()
        return self.server


#: deploy/haproxy.cfg, the configuration the README shows, is what runs here, with these changes:
#: the test's addresses, an admin socket to read the servers' states, and faster checks and timeouts.
EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"


def haproxy_config(instances: list[Instance], frontend_fd: int, stats: Path) -> str:
    text = EXAMPLE.read_text()
    kept = [line for line in text.splitlines() if not line.strip().startswith("server ")]
    text = "\n".join(kept) + "\n" + "".join(
        f"    server {i.name} {HOST}:{i.port} check port {i.admin_port}\n" for i in instances)
    for old, new in (("    bind :80", f"    bind fd@{frontend_fd}"),
                     ("global\n", f"global\n    stats socket {stats} level admin\n"),
                     ("default-server inter 1s", "default-server inter 200ms"),
                     ("maxconn 4096", "maxconn 500"),
                     ("timeout server 30s", "timeout server 3s")):
        assert old in text, f"{EXAMPLE} no longer has {old!r}: update the test with it"
        text = text.replace(old, new, 1)
    return text


class HAProxy:
    """``haproxy`` in the foreground on an inherited frontend socket, with an admin stats socket."""

    def __init__(self, instances: list[Instance], folder: Path) -> None:
        self.frontend = socket.create_server((HOST, 0), backlog=1024)
        self.frontend.set_inheritable(True)
        self.port: int = self.frontend.getsockname()[1]
        self.stats = folder / "haproxy.sock"
        config = folder / "haproxy.cfg"
        config.write_text(haproxy_config(instances, self.frontend.fileno(), self.stats))
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], pass_fds=(self.frontend.fileno(),),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def states(self) -> dict[str, str]:
        """Each server's status as HAProxy sees it (UP, DOWN, ...), from ``show stat``."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(str(self.stats))
                sock.sendall(b"show stat\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError:
            return {}
        lines = data.decode().splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        header = lines[0][2:].split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {row["svname"]: row["status"].split()[0] for row in rows
                if row.get("pxname") == "instances" and row["svname"] not in ("BACKEND", "FRONTEND")}

    def wait_state(self, name: str, state: str) -> None:
        wait_for(lambda: self.states().get(name) == state, TIMEOUT_S, f"HAProxy to see {name} {state}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        self.frontend.close()


@dataclass
class Load:
    """Clients sending GETs through HAProxy, a new connection each, until stopped."""

    port: int
    answers: list[dict[str, object]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    mismatched_clients: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, clients: int = 3) -> Load:
        for _ in range(clients):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
            try:
                conn.connect()
                assert conn.sock is not None
                local = list(conn.sock.getsockname()[:2])
                conn.request("GET", "/", headers={"Connection": "close"})
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    self.failures.append(f"status {response.status}")
                    continue
                answer = json.loads(body)
                self.answers.append(answer)
                if answer["client"] != local:
                    self.mismatched_clients += 1
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self.failures.append(repr(exc))
            finally:
                conn.close()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(TIMEOUT_S)

    def served_by(self) -> set[object]:
        return {answer["instance"] for answer in self.answers}


@pytest.fixture
def setup(server_factory: type[Server]) -> Iterator[tuple[HAProxy, list[Instance]]]:
    instances = [Instance("a", server_factory), Instance("b", server_factory)]
    with tempfile.TemporaryDirectory() as folder:
        haproxy: HAProxy | None = None
        try:
            for instance in instances:
                instance.start()
            haproxy = HAProxy(instances, Path(folder))
            for instance in instances:
                haproxy.wait_state(instance.name, "UP")
            yield haproxy, instances
        finally:
            if haproxy is not None:
                haproxy.close()
            for instance in instances:
                instance.listener.close()


def wait_answers(load: Load, more: int) -> None:
    target = len(load.answers) + more
    wait_for(lambda: len(load.answers) >= target, TIMEOUT_S, f"{more} more answers")


def test_a_rolling_restart_behind_haproxy_fails_no_request(setup: tuple[HAProxy, list[Instance]]) -> None:
    haproxy, instances = setup
    load = Load(haproxy.port).start()
    try:
        wait_answers(load, 50)
        for instance in instances:
            assert instance.server is not None
            instance.server.signal(signal.SIGTERM)
            # /readyz says 503 at once; HAProxy takes it out while it still serves.
            haproxy.wait_state(instance.name, "DOWN")
            assert instance.server.wait(timeout=TIMEOUT_S) == 0
            instance.start()
            haproxy.wait_state(instance.name, "UP")
            wait_answers(load, 50)
    finally:
        load.stop()
    assert load.failures == []
    assert load.served_by() == {"a", "b"}
    # The app saw each client's own address, from the PROXY header, not HAProxy's.
    assert load.mismatched_clients == 0


def test_an_instance_killed_under_load_is_routed_around(setup: tuple[HAProxy, list[Instance]]) -> None:
    haproxy, instances = setup
    load = Load(haproxy.port).start()
    try:
        wait_answers(load, 50)
        killed = instances[0]
        assert killed.server is not None
        killed.server.kill()
        # As if its machine were gone for good: its port answers no more (the test held a copy).
        killed.listener.close()
        haproxy.wait_state(killed.name, "DOWN")
        before = len(load.answers)
        wait_answers(load, 100)
        after_down = load.answers[before:]
    finally:
        load.stop()
    assert {answer["instance"] for answer in after_down} == {"b"}
    # With retry-on conn-failure and redispatch, what the kill costs: reported, bounded.
    print(f"HAPROXY: SIGKILL of one master under load: {len(load.failures)} failed of "
          f"{len(load.answers) + len(load.failures)} ({sorted(set(load.failures))})")
    assert len(load.failures) <= 3, load.failures
