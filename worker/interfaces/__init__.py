"""The worker's interfaces, one module each, behind one shape (``worker.interfaces.base``).

A web interface's module (and uvicorn with it) is imported only when an app
uses it.
"""

from __future__ import annotations

import importlib

from worker.app import App
from worker.interfaces.base import BootFailed, Context, Interface

__all__ = ["BootFailed", "Context", "Interface", "create"]

_CLASSES = {
    "streams": "worker.interfaces.streams:StreamsInterface",
    "blocking": "worker.interfaces.blocking:BlockingInterface",
    "server": "worker.interfaces.server:ServerInterface",
    "asgi": "worker.interfaces.asgi:AsgiInterface",
    "wsgi": "worker.interfaces.wsgi:WsgiInterface",
}


def create(app: App, context: Context) -> Interface:
    """The interface that serves ``app``.

    Raises:
        BootFailed: the interface cannot serve it as configured.
    """
    module, name = _CLASSES[app.kind.value].split(":")
    interface: Interface = getattr(importlib.import_module(module), name)(app, context)
    return interface
