"""What the lab reads from its tools: wrk's output (``bench.wrk``), py-spy's samples and perf's report
(``bench.profile``)."""

from __future__ import annotations

import pytest

from bench import wrk
from bench.profile import kernel_share, parse_perf, profile_section, role_symbols, top_functions

WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:41234/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.52ms    2.10ms  40.11ms   94.12%
  Latency Distribution
     50%    1.21ms
     75%    1.50ms
     90%    2.01ms
     99%   12.30ms
  20761 requests in 2.00s, 2.51MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  10380.12
Transfer/sec:      1.25MB
"""


def test_wrk_output_is_read() -> None:
    result = wrk.parse(WRK_OUTPUT)
    assert (result.requests, result.requests_per_s) == (20761, 10380.12)
    assert (result.p50_ms, result.p99_ms) == (1.21, 12.3)
    assert result.socket_errors == {"connect": 0, "read": 3, "write": 0, "timeout": 1}
    assert (result.errors, result.error_detail) == (6, "read 3, timeout 1, non-2xx 2")
    assert wrk.parse(WRK_OUTPUT.replace("99%   12.30ms", "99%    1.02s")).p99_ms == 1020.0
    with pytest.raises(ValueError, match="lacks"):
        wrk.parse(WRK_OUTPUT.replace("Requests/sec", "Reqs"))


def test_wrk_command_closes_connections_only_when_asked() -> None:
    assert wrk.command("wrk", 8000, "/?ms=2", 5, 16, 2) == [
        "wrk", "-t2", "-c16", "-d5s", "-H", "Connection: close", "--latency", "http://127.0.0.1:8000/?ms=2",
    ]
    assert "Connection: close" not in wrk.command("wrk", 8000, "/", 5, 16, 2, close=False)


SAMPLES = """\
_run (asyncio/events.py:80);select (selectors.py:468);epoll_pwait (libc.so.6) 6
_run (asyncio/events.py:80);Scheduler.submit (dispatcher/scheduler.py:90);sendmsg (libc.so.6) 3
_run (asyncio/events.py:81);Scheduler.submit (dispatcher/scheduler.py:95) 1
not a sample line
"""


def test_py_spy_samples_add_up_per_function_and_busy_leaves_the_wait_out() -> None:
    samples, top = top_functions(SAMPLES)
    assert samples == 10
    assert top == [("epoll_pwait (libc.so.6)", 6, 6), ("sendmsg (libc.so.6)", 3, 3),
                   ("Scheduler.submit (dispatcher/scheduler.py)", 1, 4)]
    section = profile_section(SAMPLES, 15, "native")
    assert "6 of them (60 %) in the event loop's epoll wait" in section
    assert "| 30.0 | 75.0 | 30.0 | `sendmsg (libc.so.6)` |" in section
    assert "| 60.0 | - | 60.0 | `epoll_pwait (libc.so.6)` |" in section
    assert profile_section("", 15, "native") == "py-spy recorded no samples."


PERF_REPORT = (
    "# Samples: 5K of event 'cpu-clock'\n"
    "#\n"
    " 18.00% \t   6635:python3\t[kernel.kallsyms]   \t[k] finish_task_switch.isra.0\n"
    " 16.00% \t   6633:python3\tlibpython3.11.so.1.0\t[.] _PyObject_Free\n"
    " 6.00%  \t   6634:python3\t[kernel.kallsyms]   \t[k] finish_task_switch.isra.0\n"
    " 2.00%  \t   6633:python3\t[kernel.kallsyms]   \t[k] __sys_sendmsg\n"
)


def test_perf_symbols_add_up_per_role_with_the_kernel_apart() -> None:
    symbols = parse_perf(PERF_REPORT)
    assert [(s.pid, s.kernel, s.name) for s in symbols] == [
        (6635, True, "finish_task_switch.isra.0"), (6633, False, "_PyObject_Free"),
        (6634, True, "finish_task_switch.isra.0"), (6633, True, "__sys_sendmsg"),
    ]
    assert symbols[1].label == "[.] _PyObject_Free (libpython3.11.so.1.0)"
    workers = role_symbols(symbols, {6634, 6635})  # one symbol, summed over both workers
    assert workers == {"[k] finish_task_switch.isra.0 ([kernel.kallsyms])": pytest.approx(1.0)}
    master = role_symbols(symbols, {6633})
    assert master["[.] _PyObject_Free (libpython3.11.so.1.0)"] == pytest.approx(16 / 18)
    assert kernel_share(master) == pytest.approx(2 / 18)
    assert role_symbols(symbols, {1}) == {}
