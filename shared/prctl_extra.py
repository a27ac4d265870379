"""python-prctl, the optional ``prctl`` extra: the module if it is installed.

It is GPL-3.0 and builds from source (it needs the libcap headers), so the
project works without it. The worker uses it to die with its master and to
set its process title; the master only warns, once at start, that workers
will do without.
"""

from __future__ import annotations

from types import ModuleType


def prctl_module() -> ModuleType | None:
    """Return the ``prctl`` module, or None if python-prctl is not installed."""
    try:
        import prctl
    except ImportError:
        return None
    module: ModuleType = prctl
    return module


def prctl_available() -> bool:
    """Return whether python-prctl is installed."""
    return prctl_module() is not None
