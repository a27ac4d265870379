"""The worker's interfaces, one module each, behind one shape (``worker.interfaces.base``).

The worker's own three are imported with this package, before the worker
drops privileges (the user it becomes may not be able to read the
project's code); a web interface's module, and uvicorn with it, only when
an app uses it.
"""

from __future__ import annotations

import importlib

from worker.app import App
from worker.interfaces.base import BootFailed, Context, Interface
from worker.interfaces.blocking import BlockingInterface
from worker.interfaces.server import ServerInterface
from worker.interfaces.streams import StreamsInterface

__all__ = ["BootFailed", "Context", "Interface", "create"]

_BUILT_IN: dict[str, type[Interface]] = {
    "streams": StreamsInterface, "blocking": BlockingInterface, "server": ServerInterface,
}
_WEB = {"asgi": "worker.interfaces.asgi:AsgiInterface", "wsgi": "worker.interfaces.wsgi:WsgiInterface"}


def create(app: App, context: Context) -> Interface:
    """The interface that serves ``app``.

    Raises:
        BootFailed: the interface cannot serve it as configured, or its
            module cannot be imported.
    """
    kind = app.kind.value
    cls = _BUILT_IN.get(kind)
    if cls is None:
        module, name = _WEB[kind].split(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, OSError) as exc:  # OSError: the user the worker runs as cannot read it
            raise BootFailed(f"app {app.spec}: the {kind} interface cannot be imported: {exc}") from exc
    assert cls is not None
    return cls(app, context)
