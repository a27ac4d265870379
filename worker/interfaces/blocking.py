"""``def handler(sock, addr)``: a blocking handler, one pool thread per connection.

A handed-off connection is acked from the pool thread as it picks it up, and
the ack is in the kernel before the handler runs: one waiting for a thread
is not acked, and goes to another worker if this one dies. The thread closes
the socket when the handler returns (a plain close, no shutdown: a blocking
handler may have given the socket to a child process that still writes to
it, so the FIN goes out once the master has closed its copy too).
With ``--proxy-protocol``, the thread skips the header right after the ack,
and ``addr`` is the client the header names.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from worker import proxy_header
from worker.app import App
from worker.interfaces.base import Context, TaskInterface, client_of
from worker.proxy_header import AS_IS, Proxied


class BlockingInterface(TaskInterface):
    name = "blocking"
    acks_per_handoff = False

    def __init__(self, app: App, context: Context) -> None:
        super().__init__(app, context)
        self._pool = ThreadPoolExecutor(context.threads, thread_name_prefix="handler")

    def serve(self, sock: socket.socket, conn_id: int | None, proxied: Proxied = AS_IS) -> None:
        sock.setblocking(True)
        # Its load figure as of now, counting itself: the thread may start
        # before the future below is counted.
        started = (None if conn_id is None
                   else functools.partial(self.context.ack_from_thread, conn_id, len(self._tasks) + 1))
        self._tasks.add(self.context.loop.run_in_executor(self._pool, _run, self.app, sock, started, proxied))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _run(app: App, sock: socket.socket, started: Callable[[], bool] | None, proxied: Proxied) -> None:
    with sock:
        if started is not None and not started():
            return  # not acked: the connection is still the master's to give to another worker
        if proxied.length and not proxy_header.skip(sock, proxied.length):
            return  # gone meanwhile
        app.handler(sock, client_of(sock, proxied))
