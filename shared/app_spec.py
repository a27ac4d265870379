"""The ``module:attribute`` syntax of an app spec, and the error for a spec that is wrong.

The master checks the syntax of ``--app`` before it starts anything, so a
typo is a usage error and not a worker that fails to boot; the worker checks
it again before importing (``worker.app``), and raises the same error for
every other way a spec can be wrong.
"""

from __future__ import annotations

#: ``--interface`` choices: ``auto`` (told from the app object) and the five interfaces a worker has.
INTERFACES = ("auto", "asgi", "wsgi", "streams", "blocking", "server")


class AppLoadError(Exception):
    """The app spec cannot be turned into a handler; the message says why in one line."""


def split_spec(spec: str) -> tuple[str, str]:
    """Return ``(module, attribute)`` of a ``module:attribute`` spec.

    Raises:
        AppLoadError: the spec is not of that form.
    """
    module, sep, attr = spec.partition(":")
    if not sep:
        raise AppLoadError(f"app spec {spec!r} has no colon: expected 'module:attribute'")
    if not module or not attr:
        raise AppLoadError(f"app spec {spec!r} is incomplete: expected 'module:attribute'")
    if not all(part.isidentifier() for part in module.split(".")):
        raise AppLoadError(f"app spec {spec!r}: {module!r} is not a module name")
    if not all(part.isidentifier() for part in attr.split(".")):
        raise AppLoadError(f"app spec {spec!r}: {attr!r} is not an attribute name")
    return module, attr
