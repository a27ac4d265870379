"""Finding the application from a ``module:attribute`` spec, and which interface serves it.

The spec's syntax is checked by ``shared.app_spec`` (the master checks it too,
before starting anything); importing the module and telling the interface
apart happen here, in the worker, and fail with the same ``AppLoadError``.

Five interfaces (``--interface``), told apart by the object itself under
``auto``:

- ``async def app(scope, receive, send)``, or an object with such an
  ``__call__`` (Starlette, FastAPI): ASGI 3 (``Interface.ASGI``);
- ``def app(environ, start_response)`` (Flask, Django): WSGI
  (``Interface.WSGI``), told from a blocking handler by those two names;
- ``async def handler(reader, writer)``: asyncio streams, the signature of
  ``asyncio.start_server``'s callback (``Interface.STREAMS``);
- ``def handler(sock, addr)``: blocking, run on a thread pool
  (``Interface.BLOCKING``);
- ``async def serve(worker)``: a custom server that iterates the worker's
  accepted sockets itself (``Interface.SERVER``, see ``worker.api``).

``--factory``: the attribute is called with no arguments, and what it
returns is the app.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.app_spec import INTERFACES, AppLoadError, split_spec


class HandlerKind(enum.Enum):
    """The interface that serves an app (``--interface``), as ``worker.interfaces`` names them."""

    ASGI = "asgi"
    WSGI = "wsgi"
    STREAMS = "streams"
    BLOCKING = "blocking"
    SERVER = "server"


assert ("auto", *(kind.value for kind in HandlerKind)) == INTERFACES


#: What each kind looks like, for error lines.
_SHAPES = {
    HandlerKind.ASGI: "async def app(scope, receive, send)",
    HandlerKind.WSGI: "def app(environ, start_response)",
    HandlerKind.STREAMS: "async def handler(reader, writer)",
    HandlerKind.BLOCKING: "def handler(sock, addr)",
    HandlerKind.SERVER: "async def serve(worker)",
}

#: The packages a web interface needs, all in the ``web`` extra.
_WEB_PACKAGES = {HandlerKind.ASGI: ("uvicorn",), HandlerKind.WSGI: ("uvicorn", "a2wsgi")}
WEB_EXTRA = "pip install 'rr-dispatcher[web]'"


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


def _parameter_names(obj: Callable[..., Any]) -> list[str]:
    try:
        return list(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return []


def _looks_wsgi(obj: Callable[..., Any]) -> bool:
    # (environ, start_response) and (sock, addr) both take two arguments: the
    # names PEP 3333 uses tell them apart.
    names = _parameter_names(obj)
    return names[:1] == ["environ"] or names[1:2] == ["start_response"]


def _describe(obj: object) -> str:
    params = ", ".join(_parameter_names(obj)) if callable(obj) else ""
    return f"{getattr(obj, '__name__', type(obj).__name__)}({params})"


def _detect(obj: Callable[..., Any]) -> HandlerKind | None:
    arity = _positional_arity(obj)

    def takes(n: int) -> bool:
        return arity is None or arity[0] <= n <= arity[1]

    if _is_async(obj):
        for n, kind in ((3, HandlerKind.ASGI), (2, HandlerKind.STREAMS), (1, HandlerKind.SERVER)):
            if takes(n):
                return kind
        return None
    if takes(2):
        return HandlerKind.WSGI if _looks_wsgi(obj) else HandlerKind.BLOCKING
    return None


def _fits(obj: Callable[..., Any], kind: HandlerKind) -> bool:
    """Whether ``obj`` can be served as ``kind`` (asked for by ``--interface``)."""
    arity = _positional_arity(obj)
    count = {HandlerKind.ASGI: 3, HandlerKind.WSGI: 2, HandlerKind.STREAMS: 2,
             HandlerKind.BLOCKING: 2, HandlerKind.SERVER: 1}[kind]
    if arity is not None and not arity[0] <= count <= arity[1]:
        return False
    if kind in (HandlerKind.STREAMS, HandlerKind.SERVER):
        return _is_async(obj)
    if kind in (HandlerKind.WSGI, HandlerKind.BLOCKING):
        return not _is_async(obj)
    return True  # ASGI: a sync __call__ that returns an awaitable is ASGI too (some middleware is)


def classify(spec: str, obj: object, interface: str = "auto") -> App:
    """Return the ``App`` for ``obj``, served by ``interface`` (``auto``: told from the object).

    Raises:
        AppLoadError: ``obj`` is not callable, has a signature no interface
            (or not the one asked for) accepts, or needs the ``web`` extra
            and it is not installed.
    """
    if not callable(obj):
        raise AppLoadError(f"app spec {spec!r}: {type(obj).__name__} object is not callable")
    if interface == "auto":
        kind = _detect(obj)
        if kind is None:
            expected = " or ".join(_SHAPES.values())
            raise AppLoadError(
                f"app spec {spec!r}: wrong signature {_describe(obj)}, expected {expected}")
    else:
        kind = HandlerKind(interface)
        if not _fits(obj, kind):
            raise AppLoadError(f"app spec {spec!r}: --interface {interface} needs {_SHAPES[kind]}, "
                               f"not {_describe(obj)}")
    for package in _WEB_PACKAGES.get(kind, ()):
        if importlib.util.find_spec(package) is None:
            raise AppLoadError(f"app spec {spec!r} is a{'n' if kind is HandlerKind.ASGI else ''} "
                               f"{kind.value.upper()} app: serving it needs the web extra "
                               f"({package} is missing): {WEB_EXTRA}")
    return App(spec, kind, obj)


def load(spec: str, interface: str = "auto", factory: bool = False) -> App:
    """Import the module of ``spec`` once and return its app (built by calling it if ``factory``).

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
    if factory:
        if not callable(obj):
            raise AppLoadError(f"app spec {spec!r}: --factory needs a callable, not an object "
                               f"of type {type(obj).__name__!r}")
        try:
            obj = obj()
        except Exception as exc:
            raise AppLoadError(
                f"app spec {spec!r}: the factory raised {type(exc).__name__}: {exc}") from exc
    return classify(spec, obj, interface)
