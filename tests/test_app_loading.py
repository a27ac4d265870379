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
