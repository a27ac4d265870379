"""The CPU scheduling policy of the master (and what its workers get back).

Why
---
Under load the master's cost is mostly being woken: each arriving connection
and each ack wakes it, and a task woken under the default policy preempts
whatever is running, usually a worker in the middle of a request. That costs
a context switch each way, and the master then handles one connection per
wake-up.

SCHED_BATCH tells the kernel the master is a throughput task: its wake-ups
do not preempt a running task. When every CPU is busy it runs at the next
scheduling point instead and finds several connections and acks waiting, so
it accepts, deals and sends them together (one hand-off datagram per
worker). When a CPU is idle it runs at once, so a lightly loaded server
sees no added latency. It is not a lower priority: the master's CPU share
is the same as with the default policy.

Workers keep the policy the master was started with: the kernel passes
SCHED_BATCH on to child processes (SCHED_RESET_ON_FORK undoes only real-time
policies and negative nice values), so the master tells each worker to switch
back (``python -m worker --sched``) before it loads the app.
"""

from __future__ import annotations

import os

#: ``--master-sched`` choices.
MODES = ("batch", "normal")


def apply(mode: str) -> str | None:
    """Put the calling process under ``mode``; return why that failed, or None."""
    if mode not in MODES:
        raise ValueError(f"unknown scheduling mode {mode!r}; choose from {', '.join(MODES)}")
    policy = os.SCHED_BATCH if mode == "batch" else os.SCHED_OTHER
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def switch(mode: str) -> tuple[str | None, str | None]:
    """Put the calling process (the master) under ``mode``, if it runs under one of ``MODES``.

    Returns:
        The policy its children should switch back to (None if they need not),
        and why the process was not switched (None if it was). A process
        started under a real-time or idle policy is left as it is.
    """
    original = current()
    if original not in MODES:
        return None, f"started under {original}, which is kept"
    failed = apply(mode)
    if failed:
        return None, failed
    return (original if original != mode else None), None


def current() -> str:
    """The calling process's policy, as ``--master-sched`` names it (or the kernel's number)."""
    policy = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK
    # SCHED_RESET_ON_FORK is masked in case whoever started us set it.
    return {os.SCHED_BATCH: "batch", os.SCHED_OTHER: "normal"}.get(policy, f"policy {policy}")
