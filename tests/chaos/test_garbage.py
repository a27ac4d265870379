"""Garbage from a worker: whatever a worker sends on its channel, the master serves on and replaces it.

``tests.apps.evil`` sends what it is told to on its channel to the master:
random bytes, wrong lengths, stray fds (one, and more than a datagram may
carry), acks for connections it never got, an oversized and an empty
datagram, and the messages only the master sends. For each, on a fresh
master: the worker is replaced (timed until its successor is ready), the
master answers from both workers, holds no fd more than before, and logs
no traceback. ``tests/test_bad_worker_input.py`` checks the same for its
frames; this adds the rest and the times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench.load import ask
from bench.server import Server
from shared import protocol
from shared.protocol import Drain, Handoff, Hello, Listen, Ping, Ready
from tests.chaos.support import Recorder, Targets, full_and_short, ready_pids
from tests.helpers import wait_for

APP = "tests.apps.evil:handler"
#: How long a replacement may take; an empty datagram reads as the end of the channel, and the
#: master waits a while for such a worker to exit before it kills it.
REPLACED_WITHIN_S = 10.0
_PING = protocol.encode(Ping(1))

#: (what, the line that makes the worker send it).
KINDS = [
    ("random bytes (20 datagrams)", "random 20"),
    ("unknown type", "raw ff00"),
    ("wrong length (cut short)", f"raw {_PING[:4].hex()}"),
    ("wrong length (trailing bytes)", f"raw {(_PING + b'xx').hex()}"),
    ("bad JSON in a pong", f"raw {(bytes([protocol.MessageType.PONG]) + b'{nope').hex()}"),
    ("a stray fd", f"fd {_PING.hex()}"),
    ("200 stray fds", f"fds 200 {_PING.hex()}"),
    ("an ack with an fd", f"fd {protocol.encode_ack((123456,), True).hex()}"),
    ("ack for a connection never given", f"raw {protocol.encode_ack((123456,), True).hex()}"),
    ("ack naming one id twice", f"raw {protocol.encode_ack((123456, 123456), True).hex()}"),
    ("oversized (70 kB)", "big 70000"),
    ("empty datagram", "empty"),
    ("Handoff (master only)", f"raw {protocol.encode(Handoff((1,))).hex()}"),
    ("Handoff with 64 fds (master only)", f"fds 64 {protocol.encode_handoff(list(range(64))).hex()}"),
    ("Drain (master only)", f"raw {protocol.encode(Drain()).hex()}"),
    ("Listen with an fd (master only)", f"fd {protocol.encode(Listen()).hex()}"),
    ("Ping (master only)", f"raw {_PING.hex()}"),
    ("Hello as another worker", f"raw {protocol.encode(Hello(9, 1)).hex()}"),
    ("Ready twice", f"raw {protocol.encode(Ready()).hex()}"),
]
#: The full run sends random bytes this many times, each time to a fresh master.
RANDOM_ROUNDS = 20
FULL_KINDS = [kind for kind, _ in KINDS] + ["random bytes (20 datagrams)"] * (RANDOM_ROUNDS - 1)
SHORT_KINDS = ["random bytes (20 datagrams)", "200 stray fds", "Drain (master only)"]


@dataclass(frozen=True)
class Outcome:
    kind: str
    replaced_s: float | None
    served: bool
    fds_back: bool
    traceback: bool


def _try(server_factory: type[Server], kind: str, line: str) -> Outcome:
    server = server_factory("--app", APP, workers=2).start()
    try:
        fds_before = server.fd_count()
        started = time.monotonic()
        culprit = int(ask(server.port, f"{line}\n".encode()).strip())
        replaced_s: float | None = None
        deadline = started + REPLACED_WITHIN_S + 5
        while time.monotonic() < deadline:
            pids = ready_pids(server)
            if pids is not None and len(pids) == 2 and culprit not in pids:
                replaced_s = time.monotonic() - started
                break
            time.sleep(0.02)  # another process's state: looked at again, bounded
        answers = {ask(server.port, b"ok\n").strip() for _ in range(4)}
        served = len(answers) == 2 and str(culprit) not in answers and server.proc.poll() is None
        try:
            # An answer ends (the worker's FIN) before the master has read the ack and closed its copy.
            wait_for(lambda: server.fd_count() == fds_before, 10, "")
            fds_back = True
        except TimeoutError:
            fds_back = False
        return Outcome(kind, replaced_s, served, fds_back, "Traceback" in server.log)
    finally:
        server.kill()


def _times(took: list[float | None]) -> str:
    """``0.19 s``, or ``x10 0.18-0.22 s``; ``never`` if it was not replaced."""
    if None in took:
        return "never"
    known = [t for t in took if t is not None]
    if len(known) == 1:
        return f"{known[0]:.2f} s"
    return f"x{len(known)} {min(known):.2f}-{max(known):.2f} s"


@full_and_short(FULL_KINDS, SHORT_KINDS, timeout_s=240, name="kinds")
def test_garbage_from_a_worker_gets_it_replaced(server_factory: type[Server], record: Recorder,
                                                kinds: list[str]) -> None:
    lines = dict(KINDS)
    outcomes = [_try(server_factory, kind, lines[kind]) for kind in kinds]
    targets = Targets()
    for o in outcomes:
        targets.require(o.replaced_s is not None and o.replaced_s <= REPLACED_WITHIN_S,
                        f"{o.kind}: replaced within {REPLACED_WITHIN_S:g} s")
        targets.require(o.served, f"{o.kind}: the master serves from both workers")
        targets.require(o.fds_back, f"{o.kind}: the master's fds back to where they were")
        targets.require(not o.traceback, f"{o.kind}: no traceback in the log")
    by_kind: dict[str, list[float | None]] = {}
    for o in outcomes:
        by_kind.setdefault(o.kind, []).append(o.replaced_s)
    times = "; ".join(f"{kind} {_times(took)}" for kind, took in by_kind.items())
    record(
        "f. garbage from a worker",
        f"{len(by_kind)} kinds of bad datagram sent by a worker on its channel ({len(outcomes)} times), "
        "each time to a fresh master with 2 workers",
        "master up and serving after every one, no fd left behind; time until the worker was replaced: "
        + times,
        targets,
    )
