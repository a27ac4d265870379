"""Two versions side by side (``bench.ab``): what it reads from the lab's cells and how it pairs rounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.ab import Version, comparison, lab_command, paired, parse_args


def cells(rr_rps: float, master: float, shared_rps: float) -> list[dict[str, object]]:
    return [
        {"policy": "round-robin", "requests_per_s": rr_rps, "master_us_per_conn": master,
         "workers_us_per_conn": 60.0},
        {"policy": "shared", "requests_per_s": shared_rps, "master_us_per_conn": 0.1,
         "workers_us_per_conn": 70.0},
    ]


def test_rounds_are_paired_by_position_and_counted_where_lower() -> None:
    assert paired([10.0, 12.0, 11.0], [8.0, 9.0, 12.0], ratio=False) == "-2.00 (lower in 2 of 3)"
    assert paired([100.0, 200.0], [110.0, 180.0], ratio=True) == "1.000x (lower in 1 of 2)"
    assert paired([float("nan")], [1.0], ratio=False) == "-"


def test_the_comparison_has_each_policys_figures_and_no_master_column_without_a_hand_off() -> None:
    before, after = Version("HEAD~1", Path("a")), Version("HEAD", Path("b"))
    for rr, master in ((13000.0, 11.0), (14000.0, 12.0)):
        before.add(cells(rr, master, 14000.0))
    for rr, master in ((14000.0, 8.5), (15400.0, 9.0)):
        after.add(cells(rr, master, 14500.0))
    table = comparison(before, after).replace("\u2013", "-")  # ranges are printed with an en dash
    assert "| round-robin | master µs/conn | 11.5 (11.0-12.0) | 8.8 (8.5-9.0) | -2.75 (lower in 2 of 2) |" \
        in table
    assert "| round-robin | req/s | 13500 (13000-14000) | 14700 (14000-15400) | 1.088x (lower in 0 of 2) |" \
        in table
    assert "| shared | master" not in table
    assert "| shared | workers µs/conn |" in table


def test_each_round_is_one_lab_run_of_one_repeat_without_reload_or_node() -> None:
    command = lab_command("W0", "pinned", ["round-robin", "shared"], Path("/tmp/out"))
    assert command[1:] == ["-m", "bench.lab", "--workloads", "W0", "--layouts", "pinned", "--policies",
                           "round-robin,shared", "--repeats", "1", "--no-reload", "--no-node", "--no-latest",
                           "--out", "/tmp/out"]
    args = parse_args(["HEAD~1", "."])
    assert (args.first, args.second, args.workload, args.layout, args.rounds) == ("HEAD~1", ".", "W0",
                                                                                  "pinned", 6)
    with pytest.raises(SystemExit):
        parse_args(["a", "b", "--rounds", "0"])
