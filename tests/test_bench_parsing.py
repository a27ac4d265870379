"""What the lab reads from its tools: wrk's output (``bench.wrk``), py-spy's samples and perf's report
(``bench.profile``)."""

from __future__ import annotations

import pytest

from bench import wrk
from bench.profile import (
    kernel_share,
    parse_perf,
    parse_perf_calls,
    profile_section,
    role_calls,
    role_symbols,
    top_functions,
)

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


PERF_CALLS = (
    "# Children\t    Self\t    Pid:Command\tShared Object\tSymbol\n"
    " 55.00% \t 1.00%  \t   6633:python3 \t[kernel.kallsyms]   \t[k] do_syscall_64\n"
    " 20.00% \t 0.50%  \t   6633:python3 \tlibc.so.6           \t[.] accept4\n"
    " 18.00% \t 0.07%  \t   6633:python3 \t[kernel.kallsyms]   \t[k] __x64_sys_accept4\n"
    " 17.50% \t 0.02%  \t   6633:python3 \t[kernel.kallsyms]   \t[k] __x64_sys_close\n"
    " 3.10%  \t 0.07%  \t   6633:python3 \t[kernel.kallsyms]   \t[k] __sys_sendmsg\n"
    " 0.02%  \t 0.02%  \t   6633:python3 \t[kernel.kallsyms]   \t[k] __x64_sys_sendmsg\n"
    " 6.00%  \t 0.01%  \t   6634:python3 \t[kernel.kallsyms]   \t[k] __x64_sys_close\n"
    " 16.20% \t 0.01%  \t   6634:python3 \t[kernel.kallsyms]   \t[k] ksys_write\n"
    " 0.90%  \t 0.01%  \t   6634:python3 \t[kernel.kallsyms]   \t[k] ____sys_recvmsg\n"
)
PERF_SELF = (
    " 40.00% \t   6633:python3\tlibpython3.11.so.1.0\t[.] _PyEval_EvalFrameDefault\n"
    " 2.00%  \t   6633:python3\tloop.cpython-311-x86_64-linux-gnu.so\t[.] uv__io_poll\n"
    " 1.00%  \t   6633:python3\tlibc.so.6\t[.] __memmove_avx_unaligned\n"
    " 57.00% \t   6633:python3\t[kernel.kallsyms]\t[k] finish_task_switch.isra.0\n"
    " 30.00% \t   6634:python3\t[kernel.kallsyms]\t[k] finish_task_switch.isra.0\n"
)


def test_perf_calls_give_each_system_call_its_whole_kernel_time_and_the_interpreter_its_own() -> None:
    calls = parse_perf_calls(PERF_CALLS)
    assert [(c.pid, c.kernel, c.name) for c in calls][:2] == [(6633, True, "do_syscall_64"),
                                                             (6633, False, "accept4")]
    assert calls[2].share == pytest.approx(0.18)
    master = role_calls(calls, parse_perf(PERF_SELF), {6633})
    # The kernel's entry point, not libc's wrapper nor the dispatcher; the largest of a call's
    # entry points (sendmsg's work shows under __sys_sendmsg); shares of the master's samples (100 %).
    assert master == {"accept4": pytest.approx(0.18), "close": pytest.approx(0.175),
                      "sendmsg": pytest.approx(0.031), "interpreter": pytest.approx(0.42)}
    worker = role_calls(calls, parse_perf(PERF_SELF), {6634})
    # ksys_write is write's; ____sys_recvmsg is a helper inside recvmsg, not an entry point.
    assert worker == {"close": pytest.approx(0.2), "write": pytest.approx(0.54), "interpreter": 0.0}
    assert role_calls(calls, parse_perf(PERF_SELF), {1}) == {}
