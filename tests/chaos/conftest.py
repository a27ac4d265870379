"""The fault suite's fixtures: ``record`` for each scenario's row, and the table written at the end.

Each scenario runs in full under ``-m chaos`` (``make chaos``) and as a short
variant in the normal suite. Only the full runs' rows make the table,
``bench/results/chaos.md``, written when the session ends (and printed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.chaos.support import TABLE, Recorder, Row, render_table, write_table


@pytest.fixture(scope="session")
def chaos_rows() -> Iterator[list[Row]]:
    rows: list[Row] = []
    started = time.monotonic()
    yield rows
    full = [row for row in rows if row.full]
    if full:
        write_table(full, time.monotonic() - started)
        print(f"\n\nFault suite, {len(full)} scenario(s), written to {TABLE}:\n\n{render_table(full)}")


@pytest.fixture
def record(request: pytest.FixtureRequest, chaos_rows: list[Row]) -> Recorder:
    """Record the scenario's row (full under the ``chaos`` marker, else short) and enforce its targets."""
    return Recorder(chaos_rows, full=request.node.get_closest_marker("chaos") is not None)
