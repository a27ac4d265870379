"""What the lab reads about a process's cost (``bench.proc``): user/system time and context switches.

``/proc/PID/task/TID/stat`` (utime, stime in clock ticks) and ``status``
(voluntary and involuntary context switches), parsed and summed over a
process's threads; the user/system split of a difference scaled to
schedstat's precise total; a child's rusage.
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import threading

import pytest

from bench.proc import Reading, Usage, measured, parse_stat, parse_status_switches, process_usage, readings

TICK = os.sysconf("SC_CLK_TCK")
#: The command name (field 2) holds spaces and parentheses: only the last ")" ends it.
STAT = ("4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 1234 0 5 0 "
        "731 129 0 0 20 0 3 0 12345 123456789 2345 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1")
STATUS = """\
Name:\tpython
State:\tS (sleeping)
Threads:\t3
voluntary_ctxt_switches:\t150
nonvoluntary_ctxt_switches:\t7
"""


def test_stat_gives_utime_and_stime_whatever_the_command_name() -> None:
    assert parse_stat(STAT) == (731, 129)
    with open(f"/proc/{os.getpid()}/stat") as f:
        utime, stime = parse_stat(f.read())
    assert utime >= 0 and stime >= 0


def test_status_gives_both_context_switch_counts() -> None:
    assert parse_status_switches(STATUS) == (150, 7)
    with pytest.raises(ValueError, match="ctxt_switches"):
        parse_status_switches("Name:\tpython\nvoluntary_ctxt_switches:\t3\n")


def test_usage_adds_subtracts_and_scales_its_split_to_a_precise_total() -> None:
    a, b = Usage(0.3, 0.1, 10, 2), Usage(0.1, 0.1, 4, 1)
    assert a - b == Usage(pytest.approx(0.2), 0.0, 6, 1)
    assert Usage.total([a, b]) == Usage(pytest.approx(0.4), 0.2, 14, 3)
    scaled = Usage(0.03, 0.01, 5, 1).scaled_to(0.05)  # ticks say 3:1, schedstat says 50 ms in all
    assert (scaled.user_s, scaled.system_s) == (pytest.approx(0.0375), pytest.approx(0.0125))
    assert (scaled.voluntary, scaled.involuntary) == (5, 1)
    unknown = Usage(0.0, 0.0, 2, 0).scaled_to(0.001)  # no tick counted: the split is unknown
    assert math.isnan(unknown.user_s) and math.isnan(unknown.system_s) and unknown.voluntary == 2


def test_a_process_usage_sums_its_threads() -> None:
    """A thread that burns CPU and sleeps shows up in the process's user time and voluntary switches."""
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            sum(range(10_000))
            stop.wait(0.001)  # a voluntary switch each time

    before = Reading.of(os.getpid())
    thread = threading.Thread(target=work)
    thread.start()
    try:
        stop.wait(0.3)
        during = Reading.of(os.getpid())  # while the thread still exists: its counts are in task/
    finally:
        stop.set()
        thread.join(5)
    used = measured(before, during)
    assert used.cpu_s == pytest.approx(during.cpu_s - before.cpu_s)
    assert used.cpu_s > 0.01
    assert used.voluntary >= 20
    main_only = process_usage(os.getpid())
    assert main_only.voluntary >= 0 and main_only.user_s >= 0


def test_a_gone_process_reads_as_zero() -> None:
    child = subprocess.Popen(["true"])
    child.wait(10)
    assert readings({"gone": child.pid})["gone"] == Reading(0.0, Usage())


def test_a_child_rusage_is_its_usage() -> None:
    child = subprocess.Popen(["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"])
    _, status, rusage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    usage = Usage.from_rusage(rusage)
    assert child.returncode == 0
    assert usage.cpu_s > 0
    assert isinstance(rusage, resource.struct_rusage)
