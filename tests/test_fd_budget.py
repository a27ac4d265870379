"""The master's fd budget: the limit raised at start, and connections kept within what is left."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

from bench.load import read_all
from bench.server import Server
from dispatcher.fd_budget import FdBudget, open_fds, raise_soft_limit
from tests.helpers import clients, wait_for

APP = "tests.apps.handlers:pid"
LIMIT = 128


def _at_limit(limit: int) -> tuple[str, ...]:
    """A launcher that starts the master (and so its workers) with soft and hard limit ``limit``."""
    return ("prlimit", f"--nofile={limit}:{limit}", sys.executable, "-m", "dispatcher")


def test_the_reserve_grows_with_the_slots_and_connections_get_the_rest() -> None:
    budget = FdBudget(limit=1024, fixed=20)
    assert budget.reserve(8) - budget.reserve(4) == 4 * 6  # two fds for each of three processes a slot
    assert budget.connections(4) == 1024 - budget.reserve(4)
    assert FdBudget(limit=64, fixed=60).connections(4) == 1  # never none at all


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    code = (
        "import resource; from dispatcher.fd_budget import raise_soft_limit; "
        "print(raise_soft_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    soft = min(hard, 256)
    out = subprocess.run(["prlimit", f"--nofile={soft}:{hard}", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.strip() == f"({soft}, {hard}) ({hard}, {hard})"


def test_raising_a_limit_already_at_the_hard_one_changes_nothing() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        return  # this process's own limit is the caller's; the subprocess test covers raising
    assert raise_soft_limit() == (soft, soft)
    assert open_fds() > 0


def test_at_its_fd_limit_the_master_still_starts_workers_and_answers(server_factory: type[Server]) -> None:
    """Clients beyond the budget wait in the kernel's backlog, not in the master's fds.

    Both workers stopped, so nothing is acked: the master holds everything it
    accepts. Without the budget it would accept until EMFILE and then could
    not start the worker that replaces a dead one, nor answer its control socket.
    """
    server = server_factory("--app", APP, workers=2, launcher=_at_limit(LIMIT)).start()
    assert "pending queue capped by the fd limit" in server.log
    first, second = server.worker_pids()
    os.kill(first, signal.SIGSTOP)
    os.kill(second, signal.SIGSTOP)
    try:
        with clients(server.port, 2 * LIMIT) as socks:
            def holding() -> bool:
                master = server.status()["master"]
                return master["pending"] + master["in_flight"] > 0 and master["accepted"] >= 40
            wait_for(holding, 10, "the master holding connections")
            assert server.fd_count() < LIMIT - 16  # room left for a spawn and the control socket
            os.kill(first, signal.SIGKILL)

            def replaced() -> bool:
                return any(w["state"] == "ready" and w["pid"] not in (first, second)
                           for w in server.status()["workers"])
            wait_for(replaced, 5, "a new worker ready despite the flood")
            os.kill(second, signal.SIGCONT)
            answers = [read_all(sock) for sock in socks]
    finally:
        os.kill(second, signal.SIGCONT)
    assert all(answer.strip() for answer in answers), [a for a in answers if not a.strip()][:3]
    assert "could not be started" not in server.log


def test_the_process_figures_go_missing_rather_than_fail_at_the_fd_limit() -> None:
    """psutil reads /proc, which needs an fd: at the limit the snapshot must still be taken."""
    from dispatcher.stats import ProcessSampler
    from tests.helpers import fd_table_full

    sampler = ProcessSampler(os.getpid(), max_age_s=0.0)
    with fd_table_full(room=0):
        figures = sampler.sample()
    assert figures == {}
    assert "rss_bytes" in sampler.sample()


def test_a_limit_lowered_under_the_master_is_measured_again_and_given_back(
    server_factory: type[Server],
) -> None:
    """EMFILE though the budget said there was room: hold less; once fds are free again, hold as before."""
    server = server_factory("--app", APP, workers=1, launcher=_at_limit(LIMIT)).start()
    (only,) = server.worker_pids()
    os.kill(only, signal.SIGSTOP)
    try:
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (server.fd_count() + 12, LIMIT))
        with clients(server.port, 40) as socks:
            server.wait_line(r"accept met the fd limit \(\d+ open files; .*measuring the fd budget again")
            resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
            os.kill(only, signal.SIGCONT)
            answers = [read_all(sock) for sock in socks]
            server.wait_line(r"the fd budget grows again", timeout=10)
    finally:
        os.kill(only, signal.SIGCONT)
    assert all(answer.strip() for answer in answers)
