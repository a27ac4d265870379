"""Where control sockets live, and whether a master is listening on one.

The default socket of a master is ``<runtime dir>/dispatcher/<master pid>.sock``:
the runtime dir is ``$XDG_RUNTIME_DIR``, else ``/run/user/<uid>``, else
``/tmp/dispatcher-<uid>``, and the ``dispatcher`` directory in it is made
0700 and refused if anyone else could write to it. The master makes its
socket there (``default_path``, which also removes sockets left by masters
that died); the client (``dispatcher.ctl``) looks there for the one master
running under the user.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat


class ControlError(OSError):
    """The control socket cannot be set up; the message says why in one line.

    An ``OSError``: like a failed bind, it is the host's state, not a bug.
    """


def runtime_dir(create: bool = True) -> str:
    """Return the directory for control sockets, ``<runtime dir>/dispatcher``.

    The runtime dir is ``$XDG_RUNTIME_DIR`` if it names a directory, else
    ``/run/user/<uid>`` if it exists, else ``/tmp/dispatcher-<uid>`` (made
    0700 here, since /tmp is shared).

    Parameters:
        create: make the directory (mode 0700) when it is missing.

    Raises:
        ControlError: a directory on the way is not this user's, or others may
            write to it (group/other permission bits set), or cannot be made.
    """
    uid = os.geteuid()
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if not (base and os.path.isdir(base)):
        base = f"/run/user/{uid}"
        if not os.path.isdir(base):
            base = f"/tmp/dispatcher-{uid}"
            _private_dir(base, create)
    path = os.path.join(base, "dispatcher")
    _private_dir(path, create)
    return path


def default_path() -> str:
    """Return ``<runtime dir>/dispatcher/<this pid>.sock``, making the directory if needed.

    Sockets left there by masters that died without removing them (killed:
    their pid is gone and nobody listens) are removed on the way.

    Raises:
        ControlError: as ``runtime_dir``.
    """
    directory = runtime_dir(create=True)
    _remove_dead(directory)
    return os.path.join(directory, f"{os.getpid()}.sock")


def socket_pid(name: str) -> int | None:
    """Return the master pid a default socket's file name stands for, or None."""
    stem, dot, ext = name.partition(".")
    return int(stem) if dot and ext == "sock" and stem.isdigit() else None


def pid_alive(pid: int) -> bool:
    """Return whether process ``pid`` exists (maybe as someone else's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_listening(path: str, timeout_s: float = 1.0) -> bool:
    """Return whether a server accepts connections on the Unix socket ``path``.

    Raises:
        OSError: the probe failed another way (permissions, timeout).
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(timeout_s)
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        probe.close()
    return True


def _remove_dead(directory: str) -> None:
    names: list[str] = []
    with contextlib.suppress(OSError):
        names = os.listdir(directory)
    for name in names:
        pid = socket_pid(name)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode) and not is_listening(path):
                os.unlink(path)


def _private_dir(path: str, create: bool) -> None:
    """Check that ``path`` is a directory only this user can use; make it if asked."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ControlError(f"cannot create control directory {path}: {exc.strerror}") from None
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if create:
            raise ControlError(f"control directory {path} vanished") from None
        return
    except OSError as exc:
        raise ControlError(f"cannot use control directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ControlError(f"control directory {path} is not a directory; refusing to use it")
    if info.st_uid != os.geteuid():
        raise ControlError(
            f"control directory {path} belongs to uid {info.st_uid}, not {os.geteuid()}; "
            "refusing to use it"
        )
    if info.st_mode & 0o077:
        raise ControlError(
            f"control directory {path} has mode {stat.S_IMODE(info.st_mode):04o}, "
            "open to group or others; refusing to use it (chmod 700 it or remove it)"
        )
