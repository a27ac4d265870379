"""Whatever a worker sends, the master replaces that worker and serves on."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.load import ask
from bench.server import Server
from shared import protocol
from shared.protocol import Handoff, Hello, Ping, Pong, Ready, UserMessage
from tests.helpers import wait_for

BAD_FRAMES = [
    ("raw", "ff00"),                                          # unknown type
    ("raw", protocol.encode_ack((123456,), True).hex()),      # ack for a connection never given
    ("raw", protocol.encode_ack((123456, 123456), True).hex()),  # an ack naming the same id twice
    ("raw", protocol.encode(Ping(1))[:4].hex()),              # bad length
    ("fd", protocol.encode(Ping(1)).hex()),                   # an fd where none belongs
    ("raw", protocol.encode(Handoff((1,))).hex()),            # a message only the master sends
    ("raw", protocol.encode(Hello(9, 1)).hex()),              # claims to be someone else
    ("raw", protocol.encode(Ready()).hex()),                  # ready twice
    ("big", "70000"),                                         # oversized
    ("empty", ""),                                            # a datagram of no bytes
]


@pytest.mark.parametrize(("kind", "frame"), BAD_FRAMES)
def test_bad_frame_gets_worker_replaced(server_factory: type[Server], kind: str, frame: str) -> None:
    server = server_factory("--app", "tests.apps.evil:handler", workers=2).start()
    fds_before = server.fd_count()
    culprit = ask(server.port, f"{kind} {frame}\n".encode()).strip()
    server.wait_line(rf"pid {culprit}\): .*; replacing it")
    server.wait_line(rf"pid {culprit}\) killed by SIGKILL")
    server.wait_line(r"ready")
    answers = {ask(server.port, b"ok\n").strip() for _ in range(4)}
    assert culprit not in answers and len(answers) == 2
    assert server.proc.poll() is None
    # The answers end (the worker's FIN) before the master has read the last
    # acks and closed its copies: wait for that, bounded.
    wait_for(lambda: server.fd_count() == fds_before, 10, f"master back to {fds_before} fds")


def test_an_empty_datagram_is_named_and_its_worker_replaced_at_once(server_factory: type[Server]) -> None:
    """On the channel an empty datagram reads like the worker closing it: the master tells them apart.

    Taken for a close, the worker would sit unused until the master gave up
    waiting for it to exit (5 s), and no line would say why.
    """
    server = server_factory("--app", "tests.apps.evil:handler", workers=2).start()
    culprit = int(ask(server.port, b"empty\n").strip())
    sent = time.monotonic()
    # Bounded well below the 5 s the master waits for a worker that closed its channel.
    named = rf"worker (\d) \(pid {culprit}\): empty datagram \(protocol error\); replacing it"
    line = server.wait_line(named, timeout=2)
    server.wait_line(rf"pid {culprit}\) killed by SIGKILL", timeout=2)
    assert time.monotonic() - sent < 2
    slot = int(line.group(1))
    server.wait_line(rf"worker {slot} \(pid \d+\) ready")
    workers = server.wait_ready()["workers"]
    assert [w["state"] for w in workers] == ["ready", "ready"]
    assert culprit not in {w["pid"] for w in workers}
    assert workers[slot]["last_exit"] == "killed by SIGKILL"
    assert "Traceback" not in server.log


frames = st.one_of(
    st.binary(min_size=1, max_size=40),
    st.sampled_from([
        protocol.encode(Ping(1)), protocol.encode(Pong(1, {"handled": 1})),
        protocol.encode(Ready()), protocol.encode(Hello(0, 1)),
        protocol.encode(UserMessage({"a": [1, 2]})), protocol.encode_ack((7, 8), False),
    ]).flatmap(lambda raw: st.integers(0, len(raw)).map(lambda cut: raw[:cut] or raw)),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=frames, with_fd=st.booleans())
def test_any_frame_from_a_worker_leaves_the_master_serving(
    server_factory: type[Server], frame: bytes, with_fd: bool
) -> None:
    server = server_factory("--app", "tests.apps.evil:handler", workers=2).start()
    try:
        fds_before = server.fd_count()
        culprit = ask(server.port, f"{'fd' if with_fd else 'raw'} {frame.hex()}\n".encode()).strip()
        # Whatever it was, the master answers the next connections and leaks nothing.
        for _ in range(3):
            assert ask(server.port, b"ok\n").strip()
        assert server.proc.poll() is None
        if f"pid {culprit}): " in server.log and "replacing it" in server.log:
            server.wait_line(r"worker \d \(pid \d+\) ready")
        wait_for(lambda: server.fd_count() == fds_before, 10, f"master back to {fds_before} fds")
        assert "Traceback" not in server.log
    finally:
        server.kill()
