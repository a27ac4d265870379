"""The micro-benchmarks (``bench/test_micro.py``) still run: each once, timing off.

They reach into the master's hot path (the acceptor's batch, the
scheduler's targets, the channel's buffer), so a change there that broke
one would otherwise only show in ``make bench``. Run in a process of its
own: its marker filter and benchmark options are not the suite's.
"""

from __future__ import annotations

import subprocess
import sys

from bench.server import ROOT

TIMEOUT_S = 120.0


def test_every_micro_benchmark_runs_once_and_checks_its_result() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "bench/test_micro.py", "-m", "bench or not bench", "--benchmark-disable"],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout
