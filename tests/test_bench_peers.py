"""What the server comparison (``python -m bench.peers``) reads and decides, without starting a server.

wrk's per-worker lines, the ``x-worker`` header of a raw answer, the spread
over a server's workers (one that served nothing counts), the TCP_NODELAY
answers, the command lines of the servers, and the targets.
"""

from __future__ import annotations

import math

import pytest

from bench import wrk
from bench.keepalive import Tally
from bench.peer_matrix import Idle, Nodelay, PeerCell
from bench.peer_reload import PeerReload
from bench.peer_report import reload_table, targets, workload_table
from bench.peer_servers import KINDS, NODELAY_EXTRA
from bench.stats import DASH
from bench.worker_counts import LUA, header_worker, parse, spread

WRK_WITH_COUNTS = """\
Running 1s test @ http://127.0.0.1:40000/
  2 threads and 16 connections
  20761 requests in 1.00s, 2.51MB read
Requests/sec:  20761.00
x-worker 4242 6000
x-worker 4243 4380
x-worker 4242 6001
x-worker 4243 4380
"""


def test_wrk_lines_of_every_thread_add_up_per_worker() -> None:
    assert parse(WRK_WITH_COUNTS) == {4242: 12001, 4243: 8760}
    assert parse("Requests/sec: 1.0\n") == {}


def test_the_lua_script_counts_the_header_and_prints_what_parse_reads() -> None:
    assert 'headers["x-worker"]' in LUA
    assert 'string.format("x-worker %s %d\\n", who, n)' in LUA
    assert 'thread:get("counts")' in LUA


def test_the_header_names_the_worker_in_any_case_and_the_body_does_not_count() -> None:
    answer = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Worker: 1234\r\n\r\nhello"
    assert header_worker(answer) == 1234
    assert header_worker(answer.lower()) == 1234
    assert header_worker("HTTP/1.1 200 OK\r\ncontent-length: 14\r\n\r\nx-worker: 99\r\n") is None
    assert header_worker("") is None


def test_a_worker_that_served_nothing_counts_and_strangers_are_kept_apart() -> None:
    even = spread({1: 50, 2: 50}, [1, 2])
    assert (even.jain, even.busiest_share) == (1.0, 0.5)
    lopsided = spread({1: 100, 9: 3}, [1, 2])
    assert lopsided.counts == {1: 100, 2: 0}
    assert lopsided.strangers == 3
    assert lopsided.jain == pytest.approx(0.5)
    assert lopsided.busiest_share == 1.0
    assert math.isnan(spread({}, [1, 2]).jain)


def test_nodelay_answers_give_a_verdict() -> None:
    assert Nodelay("x", ["nodelay=1 sockets=1", "nodelay=1,1 sockets=2"]).verdict == "on"
    assert Nodelay("x", ["nodelay=0 sockets=1"]).verdict == "off"
    assert Nodelay("x", ["nodelay=1 sockets=1", "nodelay=0 sockets=1"]).verdict == "mixed"
    assert Nodelay("x", ["nodelay=none sockets=0"]).verdict == "unknown"


def test_every_server_runs_the_same_loop_workers_and_no_access_log() -> None:
    for kind in KINDS.values():
        line = kind.arguments(workers=2, threads=4, port=8000)
        assert line[:2] == ["-m", kind.family]
        assert kind.app in line
        if kind.family == "gunicorn":
            assert line[line.index("-w") + 1] == "2"
            assert "--access-logfile" not in line
        else:
            assert "--no-access-log" in line
        if kind.family != "dispatcher":
            assert line[line.index("--workers" if "--workers" in line else "-w") + 1] == "2"
        if kind.interface == "asgi" and kind.family in ("dispatcher", "uvicorn", "granian"):
            assert line[line.index("--loop") + 1] == "uvloop"
    assert "uvicorn_worker.UvicornWorker" in KINDS["gunicorn"].arguments(2, 4)
    gthread = KINDS["wsgi-gunicorn"].arguments(2, 4)
    assert gthread[gthread.index("-k") + 1: gthread.index("-k") + 4] == ["gthread", "--threads", "4"]
    granian = KINDS["wsgi-granian"].arguments(2, 4)
    assert granian[granian.index("--blocking-threads") + 1] == "4"
    assert "--runtime-threads" in KINDS["granian"].arguments(2, 4)
    assert KINDS["wsgi-round-robin"].arguments(2, 4)[-2:] == ["--threads", "4"]
    assert NODELAY_EXTRA.arguments(2, 4)[NODELAY_EXTRA.arguments(2, 4).index("--loop") + 1] == "asyncio"


def test_wrk_gets_the_script_before_the_url() -> None:
    line = wrk.command("wrk", 8000, "/", 1.5, 16, 2, close=False, script="/tmp/c.lua")
    assert line == ["wrk", "-t2", "-c16", "-d1.5s", "-s", "/tmp/c.lua", "--latency", "http://127.0.0.1:8000/"]


def _cell(server: str, workload: str, layout: str, rps: float, p99: float,
          per_worker: dict[int, int] | None = None) -> PeerCell:
    return PeerCell(server=server, workload=workload, layout=layout, repeat=0, requests=1000,
                    requests_per_s=rps, p50_ms=p99 / 2, p99_ms=p99, errors=0, error_detail="",
                    per_worker=per_worker or {1: 500, 2: 500})


def _reload(server: str, failed: int) -> PeerReload:
    none = Tally(served=100, failed=0, failures={}, retried=0, resets=0)
    lost = Tally(served=100, failed=failed, failures={"reset": failed} if failed else {}, retried=2, resets=1)
    return PeerReload(server=server, workers=2, reload_s=0.5, answer="ok", close_during=none,
                      close_total=none, keepalive_during=none, keepalive_total=lost)


def test_targets_are_met_or_not_from_the_figures_side_by_side() -> None:
    cells = [
        _cell("round-robin", "W2", "pinned", 21000, 2), _cell("uvicorn", "W2", "pinned", 20000, 2),
        _cell("round-robin", "W2", "unpinned", 18000, 2), _cell("uvicorn", "W2", "unpinned", 20000, 2),
        _cell("round-robin", "W3", "unpinned", 800, 30), _cell("uvicorn", "W3", "unpinned", 800, 40),
        _cell("round-robin", "W4", "unpinned", 300, 1100, {n: 50 for n in range(8)}),
        _cell("uvicorn", "W4", "unpinned", 300, 1100, {0: 330, **{n: 10 for n in range(1, 8)}}),
    ]
    idles = [Idle("round-robin", 0, {1: 36 << 20}), Idle("uvicorn", 0, {2: 30 << 20})]
    found = {t.what.split(":")[0]: t for t in targets(cells, [_reload("round-robin", 0)], idles)}
    assert found["W2 keep-alive, pinned"].met is True
    assert "1.05x" in found["W2 keep-alive, pinned"].figures
    assert "0.90x" in found["W2 keep-alive, pinned"].figures  # unpinned beside it
    assert found["W3 /cpu, unpinned"].met is True  # 30 / 40 = 0.75
    assert found["W4 burst"].met is True
    assert "uvicorn --workers 0.182" in found["W4 burst"].figures
    assert found["rolling reload under load"].met is True
    assert found["idle worker RSS"].met is False  # 36 > 30 + 5
    assert targets([], [_reload("round-robin", 2)], [])[3].met is False
    assert all(t.met is None for t in targets([], [], []))


def test_tables_give_medians_and_sum_failures() -> None:
    cells = [_cell("uvicorn", "W1", "pinned", rps, 3.0) for rps in (100, 300, 200)]
    text = workload_table(cells, "W1", ["uvicorn", "granian"], ["pinned", "unpinned"])
    assert f"| uvicorn --workers | pinned | 200 (100{DASH}300) |" in text
    assert "granian" not in text
    reloads = reload_table([_reload("gunicorn", 1), _reload("gunicorn", 2)], ["gunicorn"])
    assert "3 (reset x3); retried 4 (of which reset 2)" in reloads
