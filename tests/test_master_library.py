"""``Master.serve()`` on the caller's own event loop, as the README shows for library use."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket

from dispatcher import Config, Master
from dispatcher.listeners import parse_bind
from dispatcher.master_accepts import MasterAccepts


def test_a_cancelled_serve_leaves_no_timer_acceptor_or_listener_behind() -> None:
    master = Master(Config(app="tests.apps.handlers:pid", workers=1, binds=[parse_bind("127.0.0.1:0")],
                           control=""))
    loop = asyncio.new_event_loop()
    pids: list[int] = []
    try:
        async def serve_then_cancel() -> None:
            serving = asyncio.create_task(master.serve())
            assert await master.wait_ready(20)
            pids.extend(w["pid"] for w in master.snapshot()["workers"] if w["pid"])
            port = int(master.listeners[0].address.rsplit(":", 1)[1])
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            with socket.socket() as probe:  # the listener is closed
                assert probe.connect_ex(("127.0.0.1", port)) != 0

        loop.run_until_complete(asyncio.wait_for(serve_then_cancel(), 30))
        distribution = master.distribution
        assert isinstance(distribution, MasterAccepts)
        # Its once-a-second timer is cancelled and its acceptor stopped: nothing of the
        # master's keeps running on the caller's loop.
        assert distribution._tick is None
        assert distribution.acceptor is not None and distribution.acceptor._stopped
        assert [h for h in loop._scheduled if not h.cancelled()] == []  # type: ignore[attr-defined]
    finally:
        for worker in master.supervisor.live():  # a cancelled serve stops no worker: end them by pid
            worker.kill(signal.SIGKILL)
            worker.proc.wait(10)
        for worker in master.supervisor.live():
            worker.channel.close()
        loop.close()
