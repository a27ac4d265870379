"""``--proxy-protocol``: the PROXY protocol header a trusted peer sends first, read in the worker.

The master never reads a byte of a connection; the worker reads the header
before the interface gets the socket, in one place for every interface
(``worker.runtime``), and leaves the connection's own bytes in the socket.

Theory of operation
-------------------
- Trust. A peer in ``--forwarded-allow-ips`` (``shared.allow_ips``) must
  send a valid header (``shared.proxy_protocol``): without one, the
  connection is closed. Any other peer's connection is served as it is, its
  bytes untouched: a header it sends is data to the app, as anything else
  an untrusted client sends.
- Peeking. ``read()`` looks at the header with ``MSG_PEEK`` only, so it
  consumes nothing: a connection not yet acked (the blocking and custom-server
  interfaces ack when their handler takes it) is still whole, for another
  worker, if this one dies. ``skip()`` consumes exactly the header's length,
  and is called at the ack point (at once when the connection was acked
  already or accepted by the worker itself). A header that has not fully
  come yet keeps the socket readable, so the wait for the rest is a short
  timer, not the loop's readiness (which would spin); an empty socket is
  waited on through the loop. All within ``HEADER_TIMEOUT_S``.
- Logging. A connection closed for want of a header is logged once per burst
  (``shared.episode``): a line at the first, a count when it is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared import proxy_protocol
from shared.allow_ips import AllowIps
from shared.episode import Episode
from worker.tasks import Tasks

log = logging.getLogger(__name__)

#: How long a trusted peer has to send its whole header.
HEADER_TIMEOUT_S = 5.0
#: What the first peek asks for: a v1 header, or a v2 one with a few TLVs, in one call.
_FIRST_PEEK = 536
#: The wait while part of a header is in the socket, doubling up to the last.
_PARTIAL_WAITS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
#: A burst of rejected connections is over once none came for this long.
_QUIET_S = 10.0


@dataclass(frozen=True)
class Proxied:
    """What the header said of one connection."""

    #: The client to present to the app (``getpeername()``'s shape); None: the socket's own peer.
    client: Any = None
    #: Header bytes still in the socket, to ``skip()`` at the ack point.
    length: int = 0


#: A connection from an untrusted peer, or one whose header is skipped already.
AS_IS = Proxied()


#: An interface's ``serve(sock, conn_id, proxied)``.
Serve = Callable[[socket.socket, "int | None", Proxied], None]


class HeaderReader:
    """Reads the PROXY protocol header of connections from trusted peers, then gives them on.

    Parameters:
        ack: the runtime's ack, for a handed-off connection closed here for want of a header.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, allow: AllowIps,
                 ack: Callable[[tuple[int, ...]], None], timeout_s: float = HEADER_TIMEOUT_S) -> None:
        self._loop = loop
        self._allow = allow
        self._ack = ack
        self.timeout_s = timeout_s
        self._first: tuple[Any, str] = (None, "")
        self.rejected = 0
        self._episode = Episode(loop, _QUIET_S, self._log_first, self._log_burst)
        self._reading = Tasks(loop, lambda exc: log.error("reading a PROXY protocol header failed",
                                                          exc_info=exc))

    @property
    def reading(self) -> int:
        """Connections whose header is being read: part of the worker's load."""
        return len(self._reading)

    async def wait_read(self) -> None:
        """Return once no header is being read (each is bounded by ``timeout_s``)."""
        await self._reading.wait_empty()

    def give(self, sock: socket.socket, conn_id: int | None, serve: Serve) -> None:
        """Read ``sock``'s header in a task of its own, then ``serve`` it with the client the header names.

        ``conn_id`` None: acked already (or accepted by the worker itself), so
        the header is consumed at once; otherwise the interface consumes it at
        its ack point. A connection with no valid header is closed (and acked:
        it is ours, the master must let go of its copy).
        """
        self._reading.add(self._loop.create_task(self._give(sock, conn_id, serve)))

    async def _give(self, sock: socket.socket, conn_id: int | None, serve: Serve) -> None:
        try:
            proxied = await self.read(sock)
        except BaseException:
            sock.close()  # cancelled at exit: nothing was consumed, un-acked ones go elsewhere
            raise
        if proxied is not None and conn_id is None and proxied.length:
            # Acked already (or never to be): the header goes now; the interface reads what follows.
            proxied = Proxied(proxied.client) if skip(sock, proxied.length) else None
        if proxied is None:
            # The FIN now: the master's copy, if any, is open until it reads the ack.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            if conn_id is not None:
                self._ack((conn_id,))
            return
        serve(sock, conn_id, proxied)

    async def read(self, sock: socket.socket) -> Proxied | None:
        """What ``sock``'s header says, without consuming it; None: no valid header (logged; close it)."""
        try:
            peer = sock.getpeername()
        except OSError:
            return AS_IS  # gone already: the interface finds out as it would have
        if not self._allow.allows(peer):
            return AS_IS
        try:
            async with asyncio.timeout(self.timeout_s):
                header = await self._peek(sock)
        except TimeoutError:
            self._reject(peer, f"no complete header within {self.timeout_s:g}s")
            return None
        except (proxy_protocol.InvalidHeader, OSError) as exc:
            self._reject(peer, str(exc) or type(exc).__name__)
            return None
        return Proxied(header.source, header.length)

    async def _peek(self, sock: socket.socket) -> proxy_protocol.Header:
        want = _FIRST_PEEK
        partial = 0
        while True:
            try:
                data = sock.recv(want, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                await self._readable(sock)
                continue
            if not data:
                raise OSError("closed before a complete header")
            result = proxy_protocol.parse(data)
            if isinstance(result, proxy_protocol.Header):
                return result
            want = max(want, result.up_to)
            await asyncio.sleep(_PARTIAL_WAITS_S[min(partial, len(_PARTIAL_WAITS_S) - 1)])
            partial += 1

    async def _readable(self, sock: socket.socket) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        fd = sock.fileno()
        self._loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            self._loop.remove_reader(fd)

    def _reject(self, peer: Any, why: str) -> None:
        self.rejected += 1
        if not self._episode.active:
            self._first = (peer, why)
        self._episode.happened()

    def _log_first(self) -> None:
        peer, why = self._first
        log.warning("closed a connection from %s with no valid PROXY protocol header (%s); "
                    "more like it until %gs pass without one are counted, not logged",
                    _host(peer), why, _QUIET_S)

    def _log_burst(self, count: int, span_s: float) -> None:
        if count > 1:
            log.warning("closed %d connections with no valid PROXY protocol header over %.1fs",
                        count, span_s)

    def close(self) -> None:
        self._episode.close()
        self._reading.cancel_all()


def skip(sock: socket.socket, length: int) -> bool:
    """Consume the ``length`` header bytes ``read()`` saw in ``sock``; False if they are not all there."""
    left = length
    with contextlib.suppress(OSError):
        while left > 0:
            data = sock.recv(left)
            if not data:
                break
            left -= len(data)
    return left == 0


def _host(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    return repr(peer)
