"""The channel over a real SOCK_SEQPACKET socketpair: fds delivered, or closed, never leaked."""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import gc
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import protocol
from shared.channel import EMPTY_DATAGRAM, PEER_CLOSED, Channel, socketpair
from shared.protocol import Handoff, Listen, Message, Ping
from tests.helpers import fd_table_full


def open_fds() -> int:
    gc.collect()  # sockets of earlier tests that only the collector closes
    return len(os.listdir("/proc/self/fd"))


class Recorder:
    def __init__(self) -> None:
        self.messages: list[tuple[Message, list[int]]] = []
        self.acks: list[tuple[tuple[int, ...], bool, int]] = []
        self.handoffs: list[tuple[tuple[int, ...], list[int]]] = []
        self.settled: list[tuple[int, int]] = []
        self.closed: list[str] = []

    def on_message(self, message: Message, fds: list[int]) -> None:
        self.messages.append((message, fds))

    def on_ack(self, conn_ids: tuple[int, ...], accepted: bool, load: int) -> None:
        self.acks.append((conn_ids, accepted, load))

    def on_acked(self, count: int, load: int) -> None:
        self.settled.append((count, load))

    def on_handoff(self, conn_ids: tuple[int, ...], fds: list[int]) -> None:
        self.handoffs.append((conn_ids, fds))

    def on_closed(self, reason: str) -> None:
        self.closed.append(reason)


def run_until(loop: asyncio.AbstractEventLoop, predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)

    async def waiter() -> None:
        while not predicate():
            await asyncio.sleep(0)  # let the reader callbacks run

    loop.run_until_complete(asyncio.wait_for(waiter(), timeout))


def send_raw(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def test_handoff_carries_a_working_socket(loop: asyncio.AbstractEventLoop) -> None:
    before = open_fds()
    a, b = socketpair()
    rec = Recorder()
    master = Channel(a, loop, rec.on_message, rec.on_closed)
    worker_rec = Recorder()
    worker = Channel(b, loop, worker_rec.on_message, worker_rec.on_closed)
    pairs = [socket.socketpair() for _ in range(3)]
    master.send_handoff([left.fileno() for left, _ in pairs])
    run_until(loop, lambda: worker_rec.messages)
    (message, fds), = worker_rec.messages
    assert message == Handoff(tuple(left.fileno() for left, _ in pairs)) and len(fds) == 3
    # Each fd is its own connection, in the order of the ids.
    for fd, (left, right) in zip(fds, pairs, strict=True):
        with socket.socket(fileno=fd) as received:
            received.sendall(str(left.fileno()).encode())
            assert right.recv(10) == str(left.fileno()).encode()
        left.close()
        right.close()
    master.close()
    worker.close()
    assert open_fds() == before


def test_acks_take_the_fast_path(loop: asyncio.AbstractEventLoop) -> None:
    a, b = socketpair()
    rec = Recorder()
    master = Channel(a, loop, rec.on_message, rec.on_closed, on_ack=rec.on_ack)
    b.send(protocol.encode_ack((5,), True, 3))
    b.send(protocol.encode_ack((6, 7, 8), False))
    b.send(protocol.encode(Ping(1)))
    run_until(loop, lambda: rec.messages)
    assert rec.acks == [((5,), True, 3), ((6, 7, 8), False, 0)]
    assert rec.messages == [(Ping(1), [])]
    master.close()
    b.close()


def test_a_master_channel_settles_good_acks_itself_and_passes_on_the_rest(
        loop: asyncio.AbstractEventLoop) -> None:
    before = open_fds()
    a, b = socketpair()
    rec = Recorder()
    copies = [os.open("/dev/null", os.O_RDONLY) for _ in range(4)]
    in_flight = dict.fromkeys(copies, 1.0)
    master = Channel(a, loop, rec.on_message, rec.on_closed, on_ack=rec.on_ack, in_flight=in_flight,
                     on_acked=rec.on_acked)
    b.send(protocol.encode_ack(copies[:2], True, 3))  # settled: the copies closed here
    b.send(protocol.encode_ack(copies[2:3], False))  # a refusal: the owner's to judge
    b.send(protocol.encode_ack((copies[3], 10_000), True))  # one not in flight: likewise
    b.send(protocol.encode(Ping(1)))
    run_until(loop, lambda: rec.messages)
    assert rec.settled == [(2, 3)]
    assert rec.acks == [(tuple(copies[2:3]), False, 0), ((copies[3], 10_000), True, 0)]
    assert rec.messages == [(Ping(1), [])]
    assert in_flight == dict.fromkeys(copies[2:], 1.0)
    for fd in copies[2:]:
        os.close(fd)
    master.close()
    b.close()
    assert open_fds() == before


def test_in_flight_and_on_acked_go_together_with_on_ack(loop: asyncio.AbstractEventLoop) -> None:
    rec = Recorder()
    for kwargs in ({"in_flight": {}}, {"on_acked": rec.on_acked},
                   {"in_flight": {}, "on_acked": rec.on_acked, "on_ack": None}):
        a, b = socketpair()
        with a, b, pytest.raises(ValueError):
            Channel(a, loop, rec.on_message, rec.on_closed, **{"on_ack": rec.on_ack, **kwargs})


@pytest.mark.parametrize("settling", [False, True], ids=["acks", "settling acks"])
@pytest.mark.parametrize(
    ("data", "nfds", "reason"),
    [
        (protocol.encode(Ping(1)), 1, "arrived with 1 fds, expected 0"),
        (protocol.encode(Handoff((1,))), 0, "arrived with 0 fds, expected 1"),
        (protocol.encode_ack((1,), True), 1, "arrived with 1 fds"),
        (protocol.encode(Handoff((1,))), 2, "arrived with 2 fds, expected 1"),
        (protocol.encode(Handoff((1, 2))), 1, "arrived with 1 fds, expected 2"),
        (protocol.encode(Handoff((1,))), protocol.MAX_FDS + 1, "truncated"),
        (b"\xfe garbage", 1, "unknown message type"),
    ],
)
def test_bad_frames_close_their_fds_and_the_channel(
    loop: asyncio.AbstractEventLoop, data: bytes, nfds: int, reason: str, settling: bool
) -> None:
    before = open_fds()
    a, b = socketpair()
    rec = Recorder()
    if settling:  # the master's channels: acks of what is in flight are settled in the channel
        channel = Channel(a, loop, rec.on_message, rec.on_closed, on_ack=rec.on_ack, in_flight={1: 0.0},
                          on_acked=rec.on_acked)
    else:
        channel = Channel(a, loop, rec.on_message, rec.on_closed, on_ack=rec.on_ack)
    extra = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
    send_raw(b, data, extra)
    for fd in extra:
        os.close(fd)
    run_until(loop, lambda: rec.closed)
    assert reason in rec.closed[0]
    assert rec.messages == [] and rec.acks == [] and rec.settled == []
    channel.close()
    b.close()
    assert open_fds() == before


def test_eof_is_reported_as_peer_closed(loop: asyncio.AbstractEventLoop) -> None:
    a, b = socketpair()
    rec = Recorder()
    channel = Channel(a, loop, rec.on_message, rec.on_closed)
    b.close()
    run_until(loop, lambda: rec.closed)
    assert rec.closed == [PEER_CLOSED]
    channel.close()


@pytest.mark.parametrize("side", ["master", "worker"])
@pytest.mark.parametrize(
    ("sent", "then", "reason"),
    [
        ([b""], "stays", EMPTY_DATAGRAM),
        ([b"", protocol.encode(Ping(1))], "closes", EMPTY_DATAGRAM),  # more queued behind it
        ([protocol.encode(Ping(1))], "closes", PEER_CLOSED),
        ([protocol.encode(Ping(1))], "shuts down", PEER_CLOSED),
    ],
    ids=["empty", "empty-then-more-then-close", "close", "shutdown"],
)
def test_an_empty_datagram_is_a_protocol_error_not_the_peer_closing(
    loop: asyncio.AbstractEventLoop, side: str, sent: list[bytes], then: str, reason: str
) -> None:
    """SOCK_SEQPACKET reads 0 bytes for an empty datagram and at EOF alike; the channel tells them apart."""
    a, b = socketpair()
    rec = Recorder()
    if side == "master":
        channel = Channel(a, loop, rec.on_message, rec.on_closed, on_ack=rec.on_ack)
    else:
        channel = Channel(a, loop, rec.on_message, rec.on_closed, on_handoff=rec.on_handoff)
    for data in sent:
        b.send(data)
    if then == "closes":
        b.close()
    elif then == "shuts down":
        b.shutdown(socket.SHUT_WR)
    run_until(loop, lambda: rec.closed)
    assert rec.closed == [reason]
    # Nothing after the empty datagram is read; a message before the end is.
    assert rec.messages == ([] if reason == EMPTY_DATAGRAM else [(Ping(1), [])])
    channel.close()
    b.close()


def test_acks_after_an_empty_datagram_of_a_dead_peer_still_count(loop: asyncio.AbstractEventLoop) -> None:
    a, b = socketpair()
    rec = Recorder()
    channel = Channel(a, loop, rec.on_message, rec.on_closed, on_ack=rec.on_ack)
    b.send(protocol.encode_ack((1,), True))
    b.send(b"")
    b.send(protocol.encode_ack((2,), True))
    b.close()
    channel.read_acks_of_dead_peer()
    assert rec.acks == [((1,), True, 0), ((2,), True, 0)]
    channel.close()


def test_a_dead_peers_last_error_is_read_and_nothing_else_it_said(loop: asyncio.AbstractEventLoop) -> None:
    """The exit can be seen before the error that explains it: reading to the end still finds it."""
    a, b = socketpair()
    rec = Recorder()
    channel = Channel(a, loop, rec.on_message, rec.on_closed, on_ack=rec.on_ack)
    b.send(protocol.encode(protocol.Ready()))
    b.send(protocol.encode(protocol.Error(3, "app spec 'a:b': no module named 'a'")))
    b.send(protocol.encode(protocol.Pong(1, {})))
    b.close()
    channel.read_acks_of_dead_peer()
    assert rec.messages == [(protocol.Error(3, "app spec 'a:b': no module named 'a'"), [])]
    channel.close()


def test_send_owns_and_closes_its_fd_and_queues_when_full(loop: asyncio.AbstractEventLoop) -> None:
    before = open_fds()
    a, b = socketpair()
    rec = Recorder()
    sender = Channel(a, loop, rec.on_message, rec.on_closed)
    # Fill the socket buffer so that later sends must wait in the outbox.
    count = 0
    while sender.backlog == 0:
        sender.send(Ping(count))
        count += 1
    fd = os.open("/dev/null", os.O_RDONLY)
    sender.send(Listen(), fd)
    assert sender.backlog >= 2
    worker_rec = Recorder()
    receiver = Channel(b, loop, worker_rec.on_message, worker_rec.on_closed)
    run_until(loop, lambda: len(worker_rec.messages) == count + 1)
    assert [m for m, _ in worker_rec.messages[:-1]] == [Ping(i) for i in range(count)]
    last, fds = worker_rec.messages[-1]
    assert last == Listen() and len(fds) == 1
    os.close(fds[0])
    assert sender.backlog == 0
    sender.close()
    receiver.close()
    assert open_fds() == before


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


@pytest.mark.parametrize("outcome", ["sent", "timed out", "peer gone"])
def test_flush_before_exit_closes_each_fd_it_was_given_once(
    loop: asyncio.AbstractEventLoop, outcome: str
) -> None:
    """Sent, timed out or refused by a peer that is gone: every queued fd is closed, and only once."""
    before = open_fds()
    a, b = socketpair()
    a.setblocking(False)
    # A full socket buffer, so what the channel is given waits in its outbox.
    filler = protocol.encode(Ping(0))
    fillers = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            a.send(filler)
            fillers += 1
    rec = Recorder()
    channel = Channel(a, loop, rec.on_message, rec.on_closed)
    given = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
    for fd in given:
        channel.send(Listen(), fd)
    assert channel.backlog == 3
    if outcome == "sent":
        for _ in range(fillers):
            b.recv(protocol.MAX_MESSAGE_BYTES)
    elif outcome == "peer gone":
        b.close()
    channel.flush_before_exit(0.05)
    assert [fd for fd in given if is_open(fd)] == []
    assert channel.backlog == 0
    # Nothing more can go out after a failure.
    assert channel.closed is (outcome != "sent")
    if outcome == "sent":
        b.settimeout(10)
        for _ in given:
            data, fds, _, _ = socket.recv_fds(b, protocol.MAX_MESSAGE_BYTES, 1)
            assert protocol.decode(data) == Listen() and len(fds) == 1
            os.close(fds[0])  # the receiver's own copy
    # The numbers are free again: whatever takes them must survive the channel's close.
    reused = [os.open("/dev/null", os.O_RDONLY) for _ in given]
    channel.close()
    assert all(is_open(fd) for fd in reused)
    for fd in reused:
        os.close(fd)
    b.close()
    assert open_fds() == before


frames = st.tuples(
    st.one_of(
        st.binary(max_size=64),  # empty too: a protocol error, not an end
        st.sampled_from([protocol.encode(Handoff((3,))), protocol.encode(Handoff((3, 4))),
                         protocol.encode(Listen()), protocol.encode(Ping(2)),
                         protocol.encode_ack((9,), True), protocol.encode_ack((9, 10), False)]),
    ),
    st.integers(0, 3),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(frames, min_size=1, max_size=8), st.sampled_from(["worker", "master", "master settling"]))
def test_any_frames_leave_no_fd_behind(
    loop: asyncio.AbstractEventLoop, batch: list[tuple[bytes, int]], side: str
) -> None:
    # No collection between the two counts (a full one per example is most of
    # this test's time): what earlier tests left to the collector stays open
    # for both, and everything opened here is closed explicitly.
    gc.disable()
    try:
        _frames_leave_no_fd_behind(loop, batch, side)
    finally:
        gc.enable()


def _frames_leave_no_fd_behind(
    loop: asyncio.AbstractEventLoop, batch: list[tuple[bytes, int]], side: str
) -> None:
    before = len(os.listdir("/proc/self/fd"))
    a, b = socketpair()
    rec = Recorder()
    if side == "worker":
        channel = Channel(a, loop, rec.on_message, rec.on_closed, on_handoff=rec.on_handoff)
    elif side == "master":
        channel = Channel(a, loop, rec.on_message, rec.on_closed, on_ack=rec.on_ack)
    else:
        # Ids 1 and 2 in flight: an ack naming them (only) is settled, which closes them.
        in_flight = {os.open("/dev/null", os.O_RDONLY): 0.0 for _ in range(2)}
        channel = Channel(a, loop, rec.on_message, rec.on_closed, on_ack=rec.on_ack,
                          in_flight=in_flight, on_acked=rec.on_acked)
    for data, nfds in batch:
        extra = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
        send_raw(b, data, extra)
        for fd in extra:
            os.close(fd)
    b.close()
    run_until(loop, lambda: rec.closed)
    for _, fds in [*rec.messages, *rec.handoffs]:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
    if side == "master settling":
        for fd in in_flight:  # what no ack settled is still ours
            os.close(fd)
    channel.close()
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("room", [1, 0], ids=["room-for-one", "no-room"])
def test_a_handoff_beyond_the_fd_limit_still_arrives_with_the_missing_fds_marked(
    loop: asyncio.AbstractEventLoop, room: int
) -> None:
    """At its fd limit, a worker still learns of every connection it was sent (to refuse them).

    With no room at all there is no ancillary data, only MSG_CTRUNC: still a
    hand-off, and the channel lives on either way.
    """
    before = open_fds()
    a, b = socketpair()
    master = Channel(a, loop, Recorder().on_message, Recorder().on_closed)
    rec = Recorder()
    worker = Channel(b, loop, rec.on_message, rec.on_closed, on_handoff=rec.on_handoff)
    sent = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
    with fd_table_full(room=room):  # room for ``room`` of the three
        master.send_handoff(sent)
        run_until(loop, lambda: rec.handoffs or rec.closed)
    (ids, fds), = rec.handoffs
    assert ids == tuple(sent) and all(fd >= 0 for fd in fds[:room]) and fds[room:] == [-1] * (3 - room)
    assert not rec.closed and not rec.messages and not worker.closed
    for fd in fds[:room]:
        os.close(fd)
    # Still open: the next hand-off arrives whole.
    master.send_handoff(sent[:1])
    run_until(loop, lambda: len(rec.handoffs) == 2 or rec.closed)
    (ids, fds) = rec.handoffs[1]
    assert ids == (sent[0],) and len(fds) == 1 and fds[0] >= 0 and not rec.closed
    os.close(fds[0])
    for fd in sent:
        os.close(fd)
    master.close()
    worker.close()
    assert open_fds() == before
