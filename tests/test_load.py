"""The load clients: ``bench.load`` (raw lines for the tests, HTTP GETs for the lab's reload run) and
``bench.flood`` (many concurrent clients in a process of its own, for the fault suite)."""

from __future__ import annotations

import re
import socket
import time

import pytest

from bench.flood import Flood
from bench.load import Load, failure_kind, http_error
from bench.server import Server


def test_raw_lines_are_counted_by_answer_and_bounded_in_count(server_factory: type[Server]) -> None:
    server = server_factory("--app", "tests.apps.handlers:pid", workers=2).start()
    with Load(server.port, clients=3, max_requests=60) as load:
        assert load.join(10)  # the count ends it: every client has stopped
    assert (load.ok, load.failed) == (60, 0), load.errors
    assert set(load.answers) == {str(pid) for pid in server.worker_pids()}
    assert sum(load.answers.values()) == 60
    with pytest.raises(TimeoutError, match="load stalled at 60 ok"):
        load.wait_requests(1, timeout=0.2)


def test_http_gets_are_timestamped_and_stop_by_themselves(server_factory: type[Server]) -> None:
    server = server_factory("--app", "examples.hello:handler", workers=2).start()
    started = time.monotonic()
    load = Load(server.port, clients=2, path="/", max_seconds=0.5)
    with load:
        load.wait_requests(10)
        assert load.join(5)  # max_seconds ends it, not stop()
    ended = time.monotonic()
    served, failed, failures = load.between(started, ended)
    assert served == load.ok >= 10 and failed == 0, failures
    assert all(started <= r.done_at <= ended and r.answer.startswith("HTTP/1.1 200") for r in load.requests)
    assert load.between(ended, ended + 60) == (0, 0, {})


def test_failures_are_kept_with_why(server_factory: type[Server]) -> None:
    # The line-protocol app does not speak HTTP: every GET fails, and says why.
    server = server_factory("--app", "tests.apps.handlers:pid", workers=1).start()
    with Load(server.port, clients=1, path="/", max_requests=5) as load:
        assert load.join(10)
    assert (load.ok, load.failed) == (0, 5)
    assert set(load.errors) == {"no HTTP answer"}
    # Nobody listening: refused, counted, and the count still bounds the load.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        with Load(port, clients=2, max_requests=6) as refused:
            assert refused.join(5)
    assert (refused.ok, refused.failed) == (0, 6)
    assert refused.errors == {"ConnectionRefusedError": 6}


@pytest.mark.parametrize(("answer", "why"), [
    ("HTTP/1.1 200 OK\r\n\r\nhello", ""),
    ("HTTP/1.0 200 OK\r\n\r\n", ""),
    ("HTTP/1.1 503 Service Unavailable\r\n\r\n", "HTTP 503"),
    ("0 1234\n", "no HTTP answer"),
    ("", "empty answer"),
])
def test_http_error_says_why_an_answer_is_not_a_200(answer: str, why: str) -> None:
    assert http_error(answer) == why


def test_an_answer_that_does_not_match_is_partial_and_failures_have_kinds(
    server_factory: type[Server],
) -> None:
    server = server_factory("--app", "tests.apps.handlers:pid", workers=1).start()
    with Load(server.port, clients=2, expect=re.compile(r"\d+ \d+\n"), max_requests=10) as whole:
        assert whole.join(10)
    assert (whole.ok, whole.failed) == (10, 0), whole.errors
    with Load(server.port, clients=2, expect=re.compile(r"\d+\n"), max_requests=4) as cut:
        assert cut.join(10)
    assert cut.errors == {"partial answer": 4} and cut.kinds == {"partial": 4}
    reasons = ["TimeoutError", "ConnectionResetError", "BrokenPipeError", "ConnectionRefusedError",
               "empty answer", "partial answer", "HTTP 503"]
    assert [failure_kind(r) for r in reasons] == ["timeout", "reset", "reset", "refused", "empty", "partial",
                                                  "HTTP 503"]


def test_the_flood_is_bounded_in_count_and_counts_failures_by_kind(server_factory: type[Server]) -> None:
    server = server_factory("--app", "tests.apps.handlers:pid", workers=2).start()
    result = Flood(server.port, 8, seconds=30, requests=300, expect=r"\d+ \d+\n").start().wait()
    assert (result.sent, result.ok, result.failures) == (300, 300, {})
    assert result.rate > 0 and result.describe_failures() == "none"
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        refused = Flood(unused.getsockname()[1], 2, seconds=30, requests=5).start().wait()
    assert (refused.sent, refused.ok, refused.failures) == (5, 0, {"refused": 5})
