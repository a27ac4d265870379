"""Listening sockets: parsing ``--bind`` specs and binding them.

Theory of operation
-------------------
The master owns every ``Listener`` socket and closes it on stop (unlinking a
Unix socket path it created). When workers accept for themselves
(``dispatcher.workers_accept``) they get *copies* (``socket.dup`` or a fresh
SO_REUSEPORT socket); those copies are passed over the channel and closed
by the master as soon as they are sent.

Closing a listening socket resets the connections in its queue. On a
graceful stop the master therefore closes each listener to new connections
first (``Listener.close_to_new``), then what the queue holds is accepted
until EAGAIN, and only then is the socket closed:

- TCP: the stop filter (``shared.syn_filter``) drops every SYN from then on.
  A client whose SYN is dropped sends it again a second later and is
  refused, as the listener is closed by then; a handshake already under way
  completes and is accepted. Under round-robin the master accepts what is
  queued (``dispatcher.acceptor``); under shared the filter is on the one
  socket every worker holds a copy of, and each worker accepts what is
  queued when it is told to drain, before closing its copy; under reuseport
  each worker's socket is its own, so each worker attaches the filter
  itself whenever it drains (``worker.acceptor``).
- Unix: a connect runs no socket filter, so the path is removed instead
  (new clients get ENOENT) and the filter is attached only as the mark that
  tells the workers the socket is closing for good.
- Inherited sockets (``fd://N``, systemd) are left as they are: the process
  that passed them may keep them open for the next instance (systemd does,
  and the connections still queued then wait for it), and a filter would
  stay on its socket after this master exits. The master still accepts
  once what is queued, as far as its pending queue has room.

What remains, and no listening socket can avoid: a handshake whose final
ACK arrives between the last accept and the close is reset (on loopback a
matter of microseconds; across a network, up to one round trip's worth of
handshakes begun just before the filter). Under round-robin the master
takes no more than its pending queue has room for (``--max-pending``); if
it is full when the stop begins, the rest of the queue is reset as before.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from shared import syn_filter

DEFAULT_BACKLOG = 2048


class BindError(Exception):
    """A ``--bind`` spec is malformed or cannot be bound; the message says which."""


@dataclass(frozen=True)
class BindSpec:
    """A parsed ``--bind`` value: TCP host and port, or a Unix socket path."""

    text: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    #: An inherited listening socket (``fd://N``, systemd socket activation).
    fd: int | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None


def parse_bind(text: str) -> BindSpec:
    """Parse ``HOST:PORT``, ``[IPV6]:PORT``, ``:PORT``, ``unix:/path`` or ``fd://N``.

    Raises:
        BindError: the spec is none of those.
    """
    if text.startswith("fd://"):
        number = text[len("fd://") :]
        if not number.isdigit():
            raise BindError(f"bind {text!r}: expected fd://N with N a file descriptor number")
        return BindSpec(text, fd=int(number))
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise BindError(f"bind {text!r}: empty Unix socket path")
        return BindSpec(text, path=path)
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep or not host:
            raise BindError(f"bind {text!r}: expected [IPV6]:PORT")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise BindError(f"bind {text!r}: expected HOST:PORT, [IPV6]:PORT or unix:/path")
        if ":" in host:
            raise BindError(f"bind {text!r}: put an IPv6 address in brackets, [{host}]:PORT")
        host = host or "0.0.0.0"
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise BindError(f"bind {text!r}: port {port_text!r} is not a number from 0 to 65535")
    return BindSpec(text, host=host, port=int(port_text))


@dataclass
class Listener:
    """A bound socket and the spec it came from."""

    spec: BindSpec
    sock: socket.socket
    #: The path to unlink on close, for a Unix socket this process created.
    owned_path: str | None = None
    #: The bound address, with the real port when port 0 was asked for. Read
    #: once, when bound: a snapshot taken while stopping must not ask the
    #: kernel about a socket already closed.
    address: str = field(init=False, default="")
    #: Nothing new joins its queue any more (``close_to_new`` took effect).
    closed_to_new: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.address = self._bound_address()

    def _bound_address(self) -> str:
        if self.spec.is_unix:
            return f"unix:{self.spec.path}"
        if self.sock.family == socket.AF_UNIX:
            return f"unix:{self.sock.getsockname()}"
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if self.sock.family == socket.AF_INET6 else f"{host}:{port}"

    @property
    def inherited(self) -> bool:
        """Passed in by another process (``fd://N``, systemd), which may hold it too."""
        return self.spec.fd is not None

    def close_to_new(self) -> None:
        """Let no new connection into the queue; what it holds stays there to be accepted.

        The first step of a graceful stop (see the theory of operation): a TCP
        socket gets the stop filter, a Unix one loses its path and gets the
        filter as a mark. An inherited socket is left as it is. Idempotent.

        Raises:
            OSError: the kernel refused the filter; the queue keeps filling until the close.
        """
        if self.inherited:
            return
        if self.owned_path is not None:
            # Removed now, and not at close: a successor may bind the path meanwhile.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.owned_path)
            self.owned_path = None
        syn_filter.attach(self.sock.fileno())
        self.closed_to_new = True

    def close(self) -> None:
        self.sock.close()
        if self.owned_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.owned_path)
            self.owned_path = None


def _resolve(spec: BindSpec) -> tuple[socket.AddressFamily, tuple[str, int] | tuple[str, int, int, int]]:
    assert spec.host is not None and spec.port is not None
    try:
        infos = socket.getaddrinfo(
            spec.host, spec.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise BindError(f"bind {spec.text!r}: cannot resolve {spec.host!r}: {exc}") from exc
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr  # type: ignore[return-value]


def _bind_tcp(
    spec: BindSpec,
    family: socket.AddressFamily,
    sockaddr: tuple[str, int] | tuple[str, int, int, int],
    reuseport: bool,
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # [::]:PORT means IPv6 only; bind 0.0.0.0 as well for IPv4.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise BindError(f"bind {spec.text!r}: {exc.strerror or exc}") from exc
    return sock


def _bind_unix(spec: BindSpec) -> socket.socket:
    assert spec.path is not None
    try:
        mode = os.stat(spec.path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise BindError(f"bind {spec.text!r}: {spec.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(spec.path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise BindError(f"bind {spec.text!r}: {exc.strerror}") from exc
            os.unlink(spec.path)  # stale: nobody listens there any more
        else:
            raise BindError(f"bind {spec.text!r}: another server is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(spec.path)
    except OSError as exc:
        sock.close()
        raise BindError(f"bind {spec.text!r}: {exc.strerror or exc}") from exc
    return sock


def open_listener(spec: BindSpec, backlog: int, *, listen: bool = True,
                  reuseport: bool = False) -> Listener:
    """Bind ``spec`` and, unless ``listen`` is False, start listening.

    Raises:
        BindError: the address cannot be resolved or bound; nothing is left open.
    """
    if spec.fd is not None:
        if reuseport:
            raise BindError(f"bind {spec.text!r}: the reuseport policy binds its own sockets; "
                            "inherited ones do not fit it")
        return Listener(spec, inherited(spec))
    if spec.is_unix:
        if reuseport:
            raise BindError(f"bind {spec.text!r}: SO_REUSEPORT does not apply to Unix sockets")
        sock = _bind_unix(spec)
        listener = Listener(spec, sock, owned_path=spec.path)
    else:
        family, sockaddr = _resolve(spec)
        listener = Listener(spec, _bind_tcp(spec, family, sockaddr, reuseport))
    if listen:
        try:
            listener.sock.listen(backlog)
        except OSError as exc:
            listener.close()
            raise BindError(f"bind {spec.text!r}: listen failed: {exc.strerror}") from exc
    listener.sock.setblocking(False)
    return listener


def open_listeners(specs: Sequence[BindSpec], backlog: int, *, listen: bool = True,
                   reuseport: bool = False) -> list[Listener]:
    """``open_listener`` for every spec; all or nothing.

    Raises:
        BindError: one spec failed; those already bound are closed again.
    """
    listeners: list[Listener] = []
    try:
        for spec in specs:
            listeners.append(open_listener(spec, backlog, listen=listen, reuseport=reuseport))
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def reuseport_sibling(listener: Listener, backlog: int) -> socket.socket:
    """Return a new listening socket on ``listener``'s exact address, SO_REUSEPORT set.

    Raises:
        BindError: the kernel refused the bind.
    """
    sockaddr = listener.sock.getsockname()
    sock = _bind_tcp(listener.spec, listener.sock.family, sockaddr, reuseport=True)
    try:
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise BindError(f"bind {listener.spec.text!r}: listen failed: {exc.strerror}") from exc
    return sock


def inherited(spec: BindSpec) -> socket.socket:
    """Adopt the listening socket at ``spec.fd`` (made close-on-exec and non-blocking).

    Raises:
        BindError: the fd is not open, not a stream socket, or not listening.
    """
    assert spec.fd is not None
    try:
        sock = socket.socket(fileno=spec.fd)
    except OSError as exc:
        raise BindError(f"bind {spec.text!r}: fd {spec.fd} is not a socket: {exc.strerror}") from exc
    try:
        if sock.type != socket.SOCK_STREAM:
            raise BindError(f"bind {spec.text!r}: fd {spec.fd} is not a stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise BindError(f"bind {spec.text!r}: fd {spec.fd} is not listening")
    except BaseException:
        sock.detach()  # not ours to close: leave the fd as we found it
        raise
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


def systemd_binds(environ: dict[str, str] | None = None) -> list[BindSpec]:
    """The sockets systemd passed (``LISTEN_FDS``), as ``fd://N`` specs.

    Only when ``LISTEN_PID`` names this process, as sd_listen_fds(3) says;
    the variables are then removed so that workers do not see them.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = env.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if not count.isdigit():
        return []
    return [parse_bind(f"fd://{fd}") for fd in range(_SD_LISTEN_FDS_START, _SD_LISTEN_FDS_START + int(count))]


_SD_LISTEN_FDS_START = 3
