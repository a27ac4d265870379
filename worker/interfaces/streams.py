"""``async def handler(reader, writer)``: the app's own asyncio streams handler, one task per connection.

The task wraps the socket in a transport and runs the handler; the socket is
the transport's from then on, and the writer is closed (FIN first, see
``_EndingWriter``) when the handler returns. The runtime acks each hand-off
before its tasks take their first step, which runs no app code. With
``--proxy-protocol``, the writer's ``get_extra_info("peername")`` is the
client the header names (the transport's own still says the proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from worker.interfaces.base import TaskInterface
from worker.proxy_header import AS_IS, Proxied

_STREAM_LIMIT = 64 * 1024


class StreamsInterface(TaskInterface):
    name = "streams"

    def serve(self, sock: socket.socket, conn_id: int | None, proxied: Proxied = AS_IS) -> None:
        self._tasks.add(self.context.loop.create_task(self._run(sock, proxied.client)))

    async def _run(self, sock: socket.socket, client: Any) -> None:
        loop = self.context.loop
        reader = asyncio.StreamReader(limit=_STREAM_LIMIT, loop=loop)
        stream_protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await loop.connect_accepted_socket(lambda: stream_protocol, sock=sock)
        writer = _EndingWriter(transport, stream_protocol, reader, loop)
        writer.client = client
        try:
            await self.app.handler(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class _EndingWriter(asyncio.StreamWriter):
    """A StreamWriter whose ``close`` sends the FIN itself, once what is buffered is written.

    A close alone ends a TCP connection only when every copy of the socket is
    closed, and the master holds one until it reads this worker's ack; under
    load that can be a scheduling slice after a short handler has finished.
    Covers the handler's own ``writer.close()`` and ours after it returns.

    ``client``: the PROXY protocol header's client, given as ``peername``.
    """

    client: Any = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername" and self.client is not None:
            return self.client
        return super().get_extra_info(name, default)

    def close(self) -> None:
        if not self.transport.is_closing() and self.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                self.write_eof()
        super().close()
