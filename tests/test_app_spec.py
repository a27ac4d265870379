"""The ``module:attribute`` syntax of an app spec, as the master and the worker both check it."""

from __future__ import annotations

import pytest

from shared.app_spec import AppLoadError, split_spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nocolon", "has no colon"),
        (":handler", "is incomplete"),
        ("module:", "is incomplete"),
        ("my-module:handler", "is not a module name"),
        ("module:not-an-attr", "is not an attribute name"),
    ],
)
def test_malformed_specs(spec: str, message: str) -> None:
    with pytest.raises(AppLoadError, match=message):
        split_spec(spec)
