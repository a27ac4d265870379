"""Finding the handler from a spec that is well formed, and each way it can still be wrong."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from shared.app_spec import AppLoadError
from worker.app import HandlerKind, classify, load


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:h", "module 'no_such_module_xyz' not found"),
        ("tests.apps.nope:h", "module 'tests.apps.nope' not found"),
        ("tests.apps.handlers:missing", "has no attribute 'missing'"),
        ("tests.apps.handlers:not_callable", "int object is not callable"),
        ("tests.apps.handlers:wrong_signature", r"wrong signature wrong_signature\(only_one\)"),
        ("tests.apps.broken:handler", "raised RuntimeError: this module is broken on purpose"),
    ],
)
def test_unloadable_specs(spec: str, message: str) -> None:
    with pytest.raises(AppLoadError, match=message) as info:
        load(spec)
    assert spec in str(info.value)
    assert "\n" not in str(info.value)


def test_kinds_are_told_apart() -> None:
    assert load("tests.apps.handlers:pid").kind is HandlerKind.STREAMS
    assert load("tests.apps.handlers:blocking").kind is HandlerKind.BLOCKING
    assert load("tests.apps.handlers:serve").kind is HandlerKind.SERVER
    assert load("examples.hello:handler").kind is HandlerKind.STREAMS


def test_callable_objects_and_defaults() -> None:
    class AsyncCallable:
        async def __call__(self, reader: Any, writer: Any) -> None: ...

    def with_default(sock: socket.socket, addr: Any, extra: int = 0) -> None: ...

    async def needs_keyword(reader: Any, writer: Any, *, flag: bool) -> None: ...

    assert classify("x:y", AsyncCallable()).kind is HandlerKind.STREAMS
    assert classify("x:y", with_default).kind is HandlerKind.BLOCKING
    with pytest.raises(AppLoadError, match="wrong signature"):
        classify("x:y", needs_keyword)


# The web interfaces, and --interface / --factory.


async def asgi_app(scope: Any, receive: Any, send: Any) -> None: ...


def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
    return []


def test_every_interface_is_told_apart_by_auto() -> None:
    from flask import Flask
    from starlette.applications import Starlette

    class AsgiObject:
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None: ...

    cases: list[tuple[object, HandlerKind]] = [
        (asgi_app, HandlerKind.ASGI),
        (AsgiObject(), HandlerKind.ASGI),
        (Starlette(), HandlerKind.ASGI),
        (wsgi_app, HandlerKind.WSGI),
        (Flask("x"), HandlerKind.WSGI),
        (load("tests.apps.handlers:pid").handler, HandlerKind.STREAMS),
        (load("tests.apps.handlers:blocking").handler, HandlerKind.BLOCKING),
        (load("tests.apps.handlers:serve").handler, HandlerKind.SERVER),
    ]
    for obj, kind in cases:
        assert classify("x:y", obj).kind is kind, obj
    assert load("examples.fastapi_app:app").kind is HandlerKind.ASGI
    assert load("examples.flask_app:app").kind is HandlerKind.WSGI


def test_an_interface_asked_for_must_fit_the_app() -> None:
    assert classify("x:y", asgi_app, "asgi").kind is HandlerKind.ASGI
    # A WSGI-looking function can still be served as a blocking handler, if asked for.
    assert classify("x:y", wsgi_app, "blocking").kind is HandlerKind.BLOCKING
    for obj, interface, needs in ((asgi_app, "wsgi", r"def app\(environ, start_response\)"),
                                  (wsgi_app, "asgi", r"async def app\(scope, receive, send\)"),
                                  (wsgi_app, "streams", r"async def handler\(reader, writer\)"),
                                  (asgi_app, "server", r"async def serve\(worker\)")):
        with pytest.raises(AppLoadError, match=f"--interface {interface} needs {needs}, not") as info:
            classify("x:y", obj, interface)
        assert "\n" not in str(info.value)


def test_wrong_signature_lists_every_interface() -> None:
    async def four(a: Any, b: Any, c: Any, d: Any) -> None: ...

    with pytest.raises(AppLoadError, match=r"wrong signature four\(a, b, c, d\), expected async def app"
                       r"\(scope, receive, send\) or def app\(environ, start_response\)"):
        classify("x:y", four)


def test_a_factory_builds_the_app() -> None:
    assert load("tests.apps.handlers:make_asgi", factory=True).kind is HandlerKind.ASGI
    with pytest.raises(AppLoadError, match="the factory raised RuntimeError: no app today"):
        load("tests.apps.handlers:failing_factory", factory=True)
    with pytest.raises(AppLoadError, match=r"--factory needs a callable, not an object of type 'int'"):
        load("tests.apps.handlers:not_callable", factory=True)


def test_a_web_app_without_the_web_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("uvicorn", "a2wsgi") else real(name, *a))
    with pytest.raises(AppLoadError, match=r"is an ASGI app: serving it needs the web extra \(uvicorn is "
                       r"missing\): pip install 'rr-dispatcher\[web\]'"):
        classify("x:y", asgi_app)
    with pytest.raises(AppLoadError, match="is a WSGI app: serving it needs the web extra"):
        classify("x:y", wsgi_app)
    assert classify("x:y", load("tests.apps.handlers:pid").handler).kind is HandlerKind.STREAMS
