"""``--drain-delay``: on TERM the master first keeps serving with ``/readyz`` at 503, then stops.

A load balancer polling ``/readyz`` takes the instance out during the delay,
before its listeners close; a second TERM or INT, or QUIT, skips the rest.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from bench.load import ask
from bench.server import Server
from dispatcher import Config, Master
from dispatcher.listeners import parse_bind
from shared.exitcodes import ExitCode
from tests.test_probes import assert_probe, probe

APP = "tests.apps.handlers:pid"
#: Short, so the suite stays quick; long enough for a few requests inside it.
DELAY_S = 2.0
#: A delay no test waits out: the stop must skip it.
LONG_DELAY_S = 60.0


def draining_server(server_factory: type[Server], delay_s: float) -> tuple[Server, str]:
    server = server_factory("--app", APP, "--metrics", "127.0.0.1:0", "--drain-delay", f"{delay_s:g}",
                            workers=2).start()
    address = server.metrics_address()
    assert_probe(probe(address, "/readyz"), 200, "ready")
    server.signal(signal.SIGTERM)
    server.wait_line(rf"SIGTERM: draining for {delay_s:g} s before stopping \(readyz says 503\); "
                     r"TERM again to stop now")
    return server, address


def test_readyz_says_draining_while_connections_are_still_served(server_factory: type[Server]) -> None:
    signalled = time.monotonic()
    server, address = draining_server(server_factory, DELAY_S)
    assert_probe(probe(address, "/readyz"), 503, f"draining for {DELAY_S:g} s before stopping")
    assert_probe(probe(address, "/healthz"), 200, "ok")
    answers = [ask(server.port) for _ in range(10)]
    assert {answer.split()[0] for answer in answers} == {"0", "1"}
    # All of that within the delay: its end is not logged yet, the stop has not begun.
    server.sync_log()
    assert "drain delay of" not in server.log and "stopping gracefully" not in server.log
    server.wait_line(rf"drain delay of {DELAY_S:g} s over: stopping gracefully", timeout=DELAY_S + 10)
    assert server.wait(timeout=15) == 0
    assert time.monotonic() - signalled >= DELAY_S


@pytest.mark.parametrize("again", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_term_or_int_during_the_delay_stops_gracefully_at_once(server_factory: type[Server],
                                                               again: signal.Signals) -> None:
    server, _ = draining_server(server_factory, LONG_DELAY_S)
    server.signal(again)
    server.wait_line(rf"{again.name} during the drain delay: stopping gracefully now")
    assert server.wait(timeout=15) == 0
    assert "drain delay of" not in server.log


def test_quit_during_the_delay_stops_fast(server_factory: type[Server]) -> None:
    server, _ = draining_server(server_factory, LONG_DELAY_S)
    server.signal(signal.SIGQUIT)
    server.wait_line(r"SIGQUIT: stopping fast \(the drain delay cut short\)")
    assert server.wait(timeout=15) == 0
    assert "stopping gracefully" not in server.log


def test_a_library_user_asks_for_the_delay_in_request_stop() -> None:
    delay_s = 0.5
    master = Master(Config(app=APP, workers=1, binds=[parse_bind("127.0.0.1:0")], control=""))
    assert master.readiness() == "not serving yet"
    loop = asyncio.new_event_loop()
    try:
        async def drain_then_stop() -> None:
            serving = asyncio.create_task(master.serve())
            assert await master.wait_ready(20)
            assert master.readiness() is None
            master.request_stop(drain_delay_s=delay_s)
            assert master.draining and not master.stopping
            assert master.readiness() == f"draining for {delay_s:g} s before stopping"
            port = int(master.listeners[0].address.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hi\n")
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.split()[0] == b"0"
            assert master.draining  # answered within the delay
            assert await asyncio.wait_for(serving, 15) == ExitCode.OK
            assert not master.draining and master.readiness() == "stopping"

        loop.run_until_complete(asyncio.wait_for(drain_then_stop(), 30))
    finally:
        for worker in master.supervisor.live():  # only if the stop did not happen: end them by pid
            worker.kill(signal.SIGKILL)
            worker.proc.wait(10)
        loop.close()
