"""Whatever a worker sends, the master replaces that worker and serves on."""

from __future__ import annotations

import pytest

from shared import protocol
from shared.protocol import Handoff, Hello, Ping, Ready
from tests.conftest import Server, ask

BAD_FRAMES = [
    ("raw", "ff00"),                                          # unknown type
    ("raw", protocol.encode_ack(123456, True).hex()),         # ack for a connection never given
    ("raw", protocol.encode(Ping(1))[:4].hex()),              # bad length
    ("fd", protocol.encode(Ping(1)).hex()),                   # an fd where none belongs
    ("raw", protocol.encode(Handoff(1)).hex()),               # a message only the master sends
    ("raw", protocol.encode(Hello(9, 1)).hex()),              # claims to be someone else
    ("raw", protocol.encode(Ready()).hex()),                  # ready twice
    ("big", "70000"),                                         # oversized
]


@pytest.mark.parametrize(("kind", "frame"), BAD_FRAMES)
def test_bad_frame_gets_worker_replaced(server_factory: type[Server], kind: str, frame: str) -> None:
    server = server_factory("--app", "tests.apps.evil:handler", workers=2).start(ready=2)
    fds_before = server.fd_count()
    culprit = ask(server.port, f"{kind} {frame}\n".encode()).strip()
    server.wait_line(rf"pid {culprit}\): .*; replacing it")
    server.wait_line(rf"pid {culprit}\) killed by SIGKILL")
    server.wait_line(r"ready")
    answers = {ask(server.port, b"ok\n").strip() for _ in range(4)}
    assert culprit not in answers and len(answers) == 2
    assert server.proc.poll() is None
    assert server.fd_count() == fds_before
