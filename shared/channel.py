"""One end of a master-worker socketpair, driven by an asyncio event loop.

Theory of operation
-------------------
The socket is AF_UNIX SOCK_SEQPACKET and non-blocking. Reading happens in the
loop's reader callback, one datagram per wake-up (a chatty peer cannot starve
the others), decoded with ``shared.protocol`` and handed to the owner's
callbacks.

fd ownership:
- An fd that arrives with a well-formed message that should carry it is
  passed to ``on_message``; from then on the owner must close it.
- An fd that arrives where none belongs, with a truncated datagram, or with a
  message that does not decode is closed here, before the owner hears of the
  error. MSG_CTRUNC means the kernel dropped descriptors that did not fit; the
  ones that did fit are closed here too.
- ``send(message, fd)`` takes ownership of ``fd``: it is closed exactly once,
  when the datagram has gone (the receiver then holds its own copy) or when
  it cannot go: the channel closes with it still queued, or
  ``flush_before_exit`` fails or runs out of time before it.
- ``send_handoff`` is the hot path and takes no ownership: the master keeps
  its copies of the connections until the worker acks, whatever happens here.
- Given ``in_flight`` (the master's copies of the connections it handed
  this peer, by id) and ``on_acked``, the channel settles an accepted ack
  itself when every id it names is in flight, each once
  (``shared.hotpath.read_ack``): the ids leave ``in_flight``, the master's
  copies are closed here, and ``on_acked`` hears how many and the load.
  Any other ack (a refusal, an id not in flight, one named twice) goes to
  ``on_ack`` untouched, for the owner to judge.
- A hand-off whose fds the kernel could not all install (MSG_CTRUNC: the
  receiver is at its fd limit) still reaches ``on_handoff``, with -1 for each
  fd that did not arrive, so the worker can refuse it and the master, which
  still holds every connection, gives them to another worker.

A protocol error, EOF or socket error closes the channel once and reports the
reason to ``on_closed``; the socket itself is closed by ``close()``.

On SOCK_SEQPACKET a datagram of no bytes and the end of the stream both read
as 0 bytes. Nothing in the protocol is empty, so an empty datagram is a
protocol error (``EMPTY_DATAGRAM``), and the peer that sent it is still there:
it must not be taken for one that closed (``PEER_CLOSED``). A 0-byte read is
the end only if the peer has shut down its side and nothing is queued behind
it (``_at_end``).
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import select
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterable

from shared import protocol
from shared.hotpath import read_ack, send_handoff
from shared.protocol import Message, ProtocolError

log = logging.getLogger(__name__)

_FD_SIZE = array.array("i").itemsize
_ANC_SIZE = socket.CMSG_SPACE(protocol.MAX_FDS * _FD_SIZE)
# Plain ints: enum flag arithmetic (an IntFlag call each time) is slow on the
# per-message path.
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_TRUNCATED = _MSG_TRUNC | _MSG_CTRUNC
# Received fds are close-on-exec at once: a handler's child process must not
# inherit client connections or listening sockets.
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)

#: The reason given to ``on_closed`` when the peer went away (EOF, EPIPE, reset),
#: as opposed to a protocol error.
PEER_CLOSED = "peer closed the channel"
#: The reason given to ``on_closed`` for a datagram of no bytes, which reads
#: like EOF but comes from a peer that is still there.
EMPTY_DATAGRAM = "empty datagram (protocol error)"

# SIOCINQ, the bytes queued to read, has the number of FIONREAD on Linux.
_SIOCINQ = termios.FIONREAD
_INT = struct.Struct("i")

OnMessage = Callable[[Message, list[int]], None]
OnAck = Callable[[tuple[int, ...], bool, int], None]
OnClosed = Callable[[str], None]
OnHandoff = Callable[[tuple[int, ...], list[int]], None]
OnAcked = Callable[[int, int], None]


def socketpair() -> tuple[socket.socket, socket.socket]:
    """Return a (master end, worker end) SOCK_SEQPACKET pair, both close-on-exec."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def close_fds(fds: Iterable[int]) -> None:
    """Close each fd, ignoring ones already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> tuple[list[int], bool]:
    """Return the fds in ``ancdata`` and whether anything else was there."""
    fds: list[int] = []
    unexpected = False
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) - len(data) % _FD_SIZE]))
        else:
            unexpected = True
    return fds, unexpected


def _queued_bytes(fileno: int) -> int:
    """Bytes of the datagrams queued on ``fileno`` (0 if that cannot be learnt)."""
    try:
        return int(_INT.unpack(fcntl.ioctl(fileno, _SIOCINQ, bytes(_INT.size)))[0])
    except OSError:
        return 0


def _at_end(fileno: int) -> bool:
    """After a read of 0 bytes from ``fileno``: True if it was the end of the stream, False if a datagram.

    The end is read only once the peer has shut down its sending side
    (POLLRDHUP, and POLLHUP once it closed) and the queue is empty; with the
    peer still there, or bytes still queued, the 0 bytes were an empty
    datagram. One empty datagram sent last, just before the peer closed,
    reads exactly like the close (same poll events, nothing queued: checked
    on Linux); the peer is gone either way.
    """
    poller = select.poll()
    poller.register(fileno, select.POLLRDHUP)
    hung_up = any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))
    return hung_up and _queued_bytes(fileno) == 0


class Channel:
    """A message channel over one SOCK_SEQPACKET socket.

    Parameters:
        sock: this side's end of the socketpair; made non-blocking here.
        loop: the running event loop that drives it.
        on_message: called with each decoded message and the fds it carried.
        on_closed: called once, with a reason, when the channel ends.
        on_ack: if given, acks skip the general decoder and come here
            (the master's hot path).
        on_handoff: likewise for hand-offs, with their fds (the worker's), one per id.
        in_flight, on_acked: if given (with ``on_ack``), accepted acks of
            connections in ``in_flight`` are settled here and told to
            ``on_acked`` with their count and load (the master's hot path).
    """

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        on_message: OnMessage,
        on_closed: OnClosed,
        on_ack: OnAck | None = None,
        on_handoff: OnHandoff | None = None,
        in_flight: dict[int, float] | None = None,
        on_acked: OnAcked | None = None,
    ) -> None:
        if (in_flight is None) != (on_acked is None) or (on_acked is not None and on_ack is None):
            raise ValueError("in_flight and on_acked go together, with on_ack")
        sock.setblocking(False)
        self._sock = sock
        self._fileno = sock.fileno()
        self._loop = loop
        self._on_message = on_message
        self._on_closed = on_closed
        self._on_ack = on_ack
        self._on_handoff = on_handoff
        self._in_flight = in_flight
        self._on_acked = on_acked
        self._buf = bytearray(protocol.MAX_MESSAGE_BYTES + 1)
        self._bufs = (memoryview(self._buf),)
        self._outbox: collections.deque[tuple[bytes, int | None]] = collections.deque()
        self._writing = False
        self._when_writable: list[Callable[[], None]] = []
        self.closed = False
        self.close_reason = ""
        loop.add_reader(self._fileno, self._on_readable)

    # Reading

    def _on_readable(self) -> bool:
        """Handle one datagram; return False if there was none (or the channel ended).

        One per wake-up: the loop's readiness is level-triggered, so a second
        datagram wakes us again, and the common case (one ack, one hand-off)
        costs no extra EAGAIN read.
        """
        try:
            if self._in_flight is not None:
                got = read_ack(self._sock, self._buf, _ANC_SIZE, _RECV_FLAGS, self._in_flight)
                if len(got) == 2:
                    # Settled: an accepted ack of connections in flight (their copies are closed).
                    assert self._on_acked is not None
                    self._on_acked(got[0], got[1])
                    return not self.closed
                n, ancdata, flags = got
            else:
                n, ancdata, flags, _ = self._sock.recvmsg_into(self._bufs, _ANC_SIZE, _RECV_FLAGS)
        except (BlockingIOError, InterruptedError):
            return False
        except (ConnectionResetError, BrokenPipeError):
            self._fail(PEER_CLOSED)
            return False
        except OSError as exc:
            self._fail(f"read error: {exc}")
            return False
        buf = self._buf
        if not ancdata and not flags & _TRUNCATED and self._on_ack is not None:
            # The master's hot path: an ack, no fds, nothing truncated.
            ack = protocol.decode_ack(buf, n)
            if ack is not None:
                self._on_ack(*ack)
                return not self.closed
        fds: list[int] = []
        if ancdata:
            fds, unexpected = fds_from_ancillary(ancdata)
            if unexpected or flags & _MSG_TRUNC:
                close_fds(fds)
                self._fail("truncated message or unexpected ancillary data")
                return False
        elif n == 0 and not flags & _TRUNCATED:
            # Rare, so the extra system calls cost the hot path nothing.
            self._fail(PEER_CLOSED if _at_end(self._fileno) else EMPTY_DATAGRAM)
            return False
        if self._on_handoff is not None:
            conn_ids = protocol.decode_handoff(buf, n)
            if conn_ids is not None:
                missing = len(conn_ids) - len(fds)
                if missing == 0 and not flags & _TRUNCATED:
                    self._on_handoff(conn_ids, fds)
                    return not self.closed
                if missing > 0 and flags & _MSG_CTRUNC:
                    # The kernel installed the first fds and dropped the rest:
                    # we are at our fd limit. Still a hand-off, to be refused.
                    self._on_handoff(conn_ids, fds + [-1] * missing)
                    return not self.closed
        if flags & _TRUNCATED:
            close_fds(fds)
            self._fail("truncated message")
            return False
        try:
            message = protocol.decode(bytes(buf[:n]))
            if len(fds) != protocol.fds_expected(message):
                raise ProtocolError(
                    f"{type(message).__name__} arrived with {len(fds)} fds, "
                    f"expected {protocol.fds_expected(message)}"
                )
        except ProtocolError as exc:
            close_fds(fds)
            self._fail(f"protocol error: {exc}")
            return False
        self._on_message(message, fds)
        return not self.closed

    # Writing

    @property
    def sock(self) -> socket.socket:
        """This side's socket (``fileno()`` -1 once closed): where hand-offs go."""
        return self._sock

    def send_handoff(self, fds: list[int]) -> None:
        """Send one hand-off of ``fds`` now, each fd its own connection id; the caller keeps its copies.

        Raises:
            BlockingIOError: the socket buffer is full; nothing was sent.
            OSError: the peer is gone; nothing was sent.
            ValueError: no fds, or more than ``protocol.MAX_FDS``.
        """
        send_handoff(self._sock, fds)

    def send(self, message: Message, fd: int | None = None) -> None:
        """Send ``message`` (with ``fd``, whose ownership passes to the channel).

        Queued in order behind anything not yet sent; a closed channel drops it
        (and closes ``fd``).

        Raises:
            ValueError: the message cannot be encoded; ``fd`` is closed.
        """
        try:
            data = protocol.encode(message)
        except ValueError:
            if fd is not None:
                close_fds((fd,))
            raise
        self.send_bytes(data, fd)

    def send_bytes(self, data: bytes, fd: int | None = None) -> None:
        """Send one pre-encoded datagram; ``fd`` as in ``send``."""
        if self.closed:
            if fd is not None:
                close_fds((fd,))
            return
        self._outbox.append((data, fd))
        if not self._writing:
            self._flush()

    def send_from_thread(self, data: bytes) -> bool:
        """Send one datagram from a thread other than the loop's, waiting while the socket is full.

        A datagram is atomic, so it cannot interleave with the loop's; it may
        overtake what the loop has queued (for an ack, harmless). Returns
        once it is in the kernel: True; False if the channel closed first.
        """
        while not self.closed:
            try:
                self._sock.send(data)
            except BlockingIOError:
                with contextlib.suppress(OSError):
                    poller = select.poll()
                    poller.register(self._fileno, select.POLLOUT)
                    poller.poll(1000)  # then look at closed again
                continue
            except InterruptedError:
                continue
            except OSError:
                return False
            return True
        return False

    def _flush(self) -> None:
        while self._outbox:
            data, fd = self._outbox[0]
            try:
                if fd is None:
                    self._sock.send(data)
                else:
                    self._sock.sendmsg(
                        (data,), ((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", (fd,))),)
                    )
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._writing = True
                    self._loop.add_writer(self._fileno, self._flush)
                return
            except (ConnectionResetError, BrokenPipeError):
                self._fail(PEER_CLOSED)
                return
            except OSError as exc:
                self._fail(f"write error: {exc}")
                return
            self._outbox.popleft()
            if fd is not None:
                close_fds((fd,))
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fileno)
        if self._when_writable:
            callbacks, self._when_writable = self._when_writable, []
            for callback in callbacks:
                callback()

    def when_writable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once everything queued is sent and the socket takes more.

        For a sender that got EAGAIN outside the outbox (``send_handoff``).
        Never called if the channel closes first.
        """
        if self.closed:
            return
        self._when_writable.append(callback)
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._fileno, self._flush)

    @property
    def backlog(self) -> int:
        """Messages queued and not yet sent."""
        return len(self._outbox)

    # Ending

    def _fail(self, reason: str) -> None:
        if self.closed:
            return
        self._stop_io(reason)
        self._on_closed(reason)

    def _stop_io(self, reason: str) -> None:
        self.closed = True
        self.close_reason = reason
        self._loop.remove_reader(self._fileno)
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fileno)
        close_fds(fd for _, fd in self._outbox if fd is not None)
        self._outbox.clear()
        self._when_writable.clear()

    def read_acks_of_dead_peer(self) -> None:
        """Read, synchronously and to the end, what a dead peer sent: acks, and its last error.

        Acks it sent before dying still count, even after the channel failed
        (a bad frame or an empty datagram, then acks). An ``Error`` goes to
        ``on_message`` too: it says why the peer died (a failed boot's line
        names it), though the exit may be seen before it is read. Anything
        else from a dead peer (ready, pong) must not change what the owner
        believes, and its fds are closed.
        """
        if self._on_ack is None:
            return
        while True:
            try:
                n, ancdata, _, _ = self._sock.recvmsg_into(self._bufs, _ANC_SIZE, _RECV_FLAGS)
            except OSError:
                return
            if ancdata:
                close_fds(fds_from_ancillary(ancdata)[0])
            elif n == 0 and _queued_bytes(self._fileno) == 0:
                # The peer is dead, so this is the end, unless it was an empty
                # datagram with more behind it (acks that still count).
                return
            ack = protocol.decode_ack(self._buf, n)
            if ack is not None:
                self._on_ack(*ack)
            elif n and not ancdata and self._buf[0] == protocol.MessageType.ERROR:
                with contextlib.suppress(ProtocolError):
                    error = protocol.decode(bytes(self._buf[:n]))
                    self._on_message(error, [])

    def flush_before_exit(self, timeout_s: float) -> None:
        """Send what is still queued, blocking up to ``timeout_s`` in all (the process is ending).

        Every queued fd is closed, sent or not. If a send fails (time is up,
        the peer is gone) the rest is dropped and the channel is closed but
        for its socket, as ``close()`` would leave it; ``on_closed`` is not
        called.
        """
        if self.closed or not self._outbox:
            return
        if self._writing:
            self._loop.remove_writer(self._fileno)
            self._writing = False
        deadline = time.monotonic() + timeout_s
        try:
            while self._outbox:
                data, fd = self._outbox.popleft()
                try:
                    # Once time is up, a timeout of 0 still sends what fits
                    # without blocking; the rest fails with EAGAIN.
                    self._sock.settimeout(max(deadline - time.monotonic(), 0.0))
                    if fd is None:
                        self._sock.send(data)
                    else:
                        self._sock.sendmsg(
                            (data,), ((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", (fd,))),)
                        )
                finally:
                    if fd is not None:
                        close_fds((fd,))
        except OSError as exc:
            self._stop_io(f"write error at exit: {exc}")
        finally:
            self._sock.setblocking(False)

    def close(self) -> None:
        """Stop reading and writing and close the socket; ``on_closed`` is not called."""
        if not self.closed:
            self._stop_io("closed")
        self._sock.close()
