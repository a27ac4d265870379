"""Finding the application from a ``module:attribute`` spec, and what kind it is.

The spec's syntax is checked by ``shared.app_spec`` (the master checks it too,
before starting anything); importing the module and telling the kind apart
happen here, in the worker, and fail with the same ``AppLoadError``.

Three kinds, told apart by the object itself:

- ``async def handler(reader, writer)``: asyncio streams, the signature of
  ``asyncio.start_server``'s callback (``HandlerKind.STREAMS``);
- ``def handler(sock, addr)``: blocking, run on a thread pool
  (``HandlerKind.BLOCKING``);
- ``async def serve(worker)``: a custom server that iterates the worker's
  accepted sockets itself (``HandlerKind.SERVER``, see ``worker.api``).
"""

from __future__ import annotations

import enum
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.app_spec import AppLoadError, split_spec


class HandlerKind(enum.Enum):
    STREAMS = "streams"
    BLOCKING = "blocking"
    SERVER = "server"


@dataclass(frozen=True)
class App:
    spec: str
    kind: HandlerKind
    handler: Callable[..., Any]


def _is_async(obj: object) -> bool:
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004 - an instance with async __call__
    )


def _positional_arity(obj: Callable[..., Any]) -> tuple[int, int] | None:
    """Return (required, maximum) positional parameters, or None if unknowable."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    required = maximum = 0
    for param in signature.parameters.values():
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            maximum += 1
            if param.default is param.empty:
                required += 1
        elif param.kind is param.VAR_POSITIONAL:
            maximum = 1 << 16
        elif param.kind is param.KEYWORD_ONLY and param.default is param.empty:
            return (1 << 16, 0)  # a required keyword-only parameter can never be passed
    return required, maximum


def classify(spec: str, obj: object) -> App:
    """Return the ``App`` for handler ``obj``.

    Raises:
        AppLoadError: ``obj`` is not callable or has a signature no kind accepts.
    """
    if not callable(obj):
        raise AppLoadError(f"app spec {spec!r}: {type(obj).__name__} object is not callable")
    arity = _positional_arity(obj)

    def takes(n: int) -> bool:
        return arity is None or arity[0] <= n <= arity[1]

    if _is_async(obj):
        if takes(2):
            return App(spec, HandlerKind.STREAMS, obj)
        if takes(1):
            return App(spec, HandlerKind.SERVER, obj)
        expected = "async def handler(reader, writer) or async def serve(worker)"
    else:
        if takes(2):
            return App(spec, HandlerKind.BLOCKING, obj)
        expected = "def handler(sock, addr) or async def handler(reader, writer)"
    params = ", ".join(inspect.signature(obj).parameters)
    signature = f"{getattr(obj, '__name__', type(obj).__name__)}({params})"
    raise AppLoadError(f"app spec {spec!r}: wrong signature {signature}, expected {expected}")


def load(spec: str) -> App:
    """Import the module of ``spec`` once and return its handler.

    The current directory comes first on ``sys.path``, as for ``python -m``,
    so apps next to where the server was started are found.

    Raises:
        AppLoadError: any way the spec can be wrong, in one line naming it.
    """
    module_name, attr = split_spec(spec)
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            module_name == exc.name or module_name.startswith(exc.name + ".")
        ):
            raise AppLoadError(f"app spec {spec!r}: module {module_name!r} not found") from exc
        raise AppLoadError(
            f"app spec {spec!r}: importing {module_name!r} failed: {exc}"
        ) from exc
    except Exception as exc:
        raise AppLoadError(
            f"app spec {spec!r}: importing {module_name!r} raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppLoadError(
                f"app spec {spec!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    return classify(spec, obj)
