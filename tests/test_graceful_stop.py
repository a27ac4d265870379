"""A graceful stop under a flood of new connections: no connection the kernel took is reset.

Closing a listening socket resets every connection still in its queue, and
under load the queue is rarely empty. Here clients open new connections in a
tight loop (each sends a line and reads the answer to the end) while the
master is sent SIGTERM. Once the listener is closed a client may be refused:
it never got a connection, and it (or a balancer) can retry. What must not
happen is a connection the client saw established that is then reset, or
closed without an answer.

Each test stops a server several times: one stop catches the race only now
and then, so one stop would pass by luck without the stop filter.
"""

from __future__ import annotations

import os
import signal

import pytest

from bench.load import Load, read_all
from bench.server import Server
from tests.helpers import clients

APP = "tests.apps.handlers:pid"
#: Client threads, each a new connection per request.
CLIENTS = 64
#: Stops per policy.
STOPS = 6
#: Successful requests before each stop, so the flood is in full swing.
WARM_UP = 100
#: A client that never got a connection: the listener was closed.
REFUSED = "ConnectionRefusedError"


@pytest.mark.parametrize("policy", ["round-robin", "shared", "reuseport"])
def test_graceful_stop_under_a_flood_resets_no_connection(server_factory: type[Server], policy: str) -> None:
    loads: list[Load] = []
    for _ in range(STOPS):
        server = server_factory("--app", APP, "--policy", policy, workers=2).start()
        load = Load(server.port, CLIENTS, max_seconds=60)
        loads.append(load)
        load.start()
        load.wait_requests(WARM_UP, timeout=10)
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
        # A client whose SYN the closing listener dropped is refused when its
        # SYN is sent again, a second later: joined once, after every stop.
        load.stop(join=False)
    assert all(load.join() for load in loads)
    per_stop = [load.errors for load in loads]
    lost = [{why: n for why, n in errors.items() if why != REFUSED} for errors in per_stop]
    refused = sum(errors[REFUSED] for errors in per_stop)
    served = sum(load.ok for load in loads)
    print(f"{policy}: {STOPS} stops, {served} served, {refused} refused, lost {lost}")
    assert not any(lost), f"connections reset or unanswered, per stop: {lost}"
    # The flood went on past each close, or the stop was not tested under it.
    assert all(errors[REFUSED] for errors in per_stop), per_stop
    assert all(load.ok >= WARM_UP for load in loads)


def test_a_backlog_longer_than_the_pending_queue_is_served_not_reset(server_factory: type[Server]) -> None:
    """The queue holds 2 and the worker 1; the other 7 wait in the kernel's backlog when TERM comes.

    The listener, closed to new connections, stays open until they too have
    been accepted (as the queue makes room) and answered.
    """
    server = server_factory("--app", APP, "--max-pending", "2", "--window", "1", workers=1).start()
    (only,) = server.worker_pids()
    os.kill(only, signal.SIGSTOP)
    try:
        with clients(server.port, 10) as socks:
            server.wait_line(r"pending queue full \(2 connections\)")
            server.signal(signal.SIGTERM)
            server.wait_line(r"SIGTERM: stopping gracefully")
            os.kill(only, signal.SIGCONT)
            answers = [read_all(sock).split() for sock in socks]
    finally:
        os.kill(only, signal.SIGCONT)
    assert [answer[1:] for answer in answers] == [[str(only)]] * 10
    assert server.wait(timeout=15) == 0
    assert "accepted 7 connection(s) still in the backlog" in server.log


def test_a_fast_stop_while_the_backlog_is_still_being_taken_ends(server_factory: type[Server]) -> None:
    """INT again cuts the sweep short: the closed listeners must not be swept (EBADF) for ever."""
    server = server_factory("--app", "tests.apps.handlers:blocking_sleep", "--threads", "1",
                            "--window", "4", "--max-pending", "2", workers=1).start()
    with clients(server.port, 12, b"sleep 1\n"):
        server.wait_line(r"pending queue full")
        server.signal(signal.SIGTERM)
        server.wait_line(r"stopping gracefully")
        server.signal(signal.SIGINT)
        server.wait_line(r"stopping fast")
        assert server.wait(timeout=10) == 0
