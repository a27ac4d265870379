"""Two versions of the code side by side: the lab's cells for each, in alternating rounds.

    .venv/bin/python -m bench.ab HEAD~1 HEAD                  # W0 pinned, round-robin and shared, 6 rounds
    .venv/bin/python -m bench.ab main . --workload W1 --rounds 4
    .venv/bin/python -m bench.ab HEAD~1 HEAD --policies round-robin --layout unpinned

The lab measures one tree, and on a shared machine the same code varies
by a third from one stretch of minutes to the next: what a change does is
only visible as a comparison of both versions made in the same minutes.
Each version is a git revision (exported with ``git archive`` into a
temporary directory, its compiled modules built there in place) or ``.``
for the working tree as it is (built as it is). Every round runs the lab
once on each (``python -m bench.lab --workloads W --layouts L --policies P
--repeats 1 --no-reload --no-node --no-latest``, from that version's own
directory, so each is measured by its own lab), the order swapped every
other round so that neither always goes first. The report gives, per
policy, each version's median and range of requests/s and of the master's
and the workers' CPU per connection, and the paired figures: the median
of the second's ratio (requests/s) or difference (µs) to the first in the
same round, and in how many rounds it was lower. Printed, and written to
``bench/results/ab-<UTC timestamp>.md`` with the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import report
from bench.server import ROOT
from bench.stats import median, spread

#: The lab's figures a comparison reads from each cell of its JSON report.
FIGURES = ("requests_per_s", "master_us_per_conn", "workers_us_per_conn")
#: Bound on one lab run (a round of one version): start-ups, warm-up and the cells.
LAB_TIMEOUT_S = 600.0
#: Bound on building a version's compiled modules.
BUILD_TIMEOUT_S = 300.0


@dataclass
class Version:
    """One side of the comparison: what the user named, and the directory it runs from."""

    name: str
    path: Path
    #: Per policy, per figure: one value per round.
    figures: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, cells: Sequence[dict[str, object]]) -> None:
        """Take one lab run's cells (the JSON report's ``cells``)."""
        for cell in cells:
            per = self.figures.setdefault(str(cell["policy"]), {name: [] for name in FIGURES})
            for name in FIGURES:
                value = cell.get(name)
                per[name].append(float(value) if isinstance(value, (int, float)) else float("nan"))


def export(revision: str, into: Path) -> Path:
    """``revision`` of this repository as files in ``into``, its compiled modules built in place.

    Raises:
        subprocess.CalledProcessError: not a revision, or the build failed.
    """
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True,
                             check=True, timeout=60)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True, timeout=60)
    build(into)
    return into


def build(tree: Path) -> None:
    """Build ``tree``'s compiled modules next to their sources (setuptools, from its pyproject.toml)."""
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "build_ext", "--inplace",
                    "-q"], cwd=tree, check=True, capture_output=True, timeout=BUILD_TIMEOUT_S)


def lab_command(workload: str, layout: str, policies: Sequence[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "bench.lab", "--workloads", workload, "--layouts", layout,
            "--policies", ",".join(policies), "--repeats", "1", "--no-reload", "--no-node", "--no-latest",
            "--out", str(out)]


def run_lab(version: Version, command: list[str], out: Path) -> list[dict[str, object]]:
    """One lab run from ``version``'s directory; its cells.

    Raises:
        RuntimeError: the lab failed or wrote no report.
    """
    before = set(out.glob("lab-*.json"))
    env = {**os.environ, "PYTHONPATH": str(version.path)}
    done = subprocess.run(command, cwd=version.path, env=env, capture_output=True, text=True,
                          timeout=LAB_TIMEOUT_S, check=False)
    written = sorted(set(out.glob("lab-*.json")) - before)
    if done.returncode != 0 or not written:
        raise RuntimeError(f"the lab of {version.name} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout)[-1500:]}")
    cells: list[dict[str, object]] = json.loads(written[-1].read_text())["cells"]
    return cells


def _range(values: Sequence[float], digits: int) -> str:
    return spread(values, f".{digits}f")


def paired(first: Sequence[float], second: Sequence[float], ratio: bool) -> str:
    """The second against the first, round by round: the median ratio or difference, how often lower."""
    pairs = [(a, b) for a, b in zip(first, second, strict=False) if a == a and b == b]  # no NaN
    if not pairs:
        return "-"
    changes = [b / a if ratio else b - a for a, b in pairs if not ratio or a]
    lower = sum(b < a for a, b in pairs)
    middle = median(changes)
    shown = f"{middle:.3f}x" if ratio else f"{middle:+.2f}"
    return f"{shown} (lower in {lower} of {len(pairs)})"


def comparison(first: Version, second: Version) -> str:
    """The Markdown table: per policy and figure, both versions' medians and the paired change."""
    labels = {"requests_per_s": ("req/s", 0, True), "master_us_per_conn": ("master µs/conn", 1, False),
              "workers_us_per_conn": ("workers µs/conn", 1, False)}
    rows = []
    for policy in [p for p in first.figures if p in second.figures]:
        for name, (label, digits, ratio) in labels.items():
            a, b = first.figures[policy][name], second.figures[policy][name]
            if policy != "round-robin" and name == "master_us_per_conn":
                continue  # the master does nothing per connection when the workers accept
            rows.append([policy, label, _range(a, digits), _range(b, digits), paired(a, b, ratio)])
    header = ["policy", "figure", f"{first.name}: median (range)", f"{second.name}: median (range)",
              f"{second.name} against {first.name}, same round"]
    return report.table(header, rows)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="a git revision, or . for the working tree")
    parser.add_argument("second", help="a git revision, or . for the working tree")
    parser.add_argument("--workload", default="W0", help="the lab's workload (default %(default)s)")
    parser.add_argument("--layout", default="pinned", choices=("pinned", "unpinned"),
                        help="CPU layout (default %(default)s)")
    parser.add_argument("--policies", default="round-robin,shared",
                        help="comma-separated (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=6,
                        help="rounds, each running both (default %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="where the report goes (default bench/results)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    policies = [p for p in args.policies.split(",") if p]
    with tempfile.TemporaryDirectory(prefix="dispatcher-ab-") as tmp:
        work = Path(tmp)
        versions = []
        for index, name in enumerate((args.first, args.second)):
            if name == ".":
                build(ROOT)
                versions.append(Version("working tree", ROOT))
            else:
                print(f"exporting and building {name} ...", flush=True)
                try:
                    versions.append(Version(name, export(name, work / f"v{index}")))
                except subprocess.CalledProcessError as exc:
                    print(f"cannot use {name}: {(exc.stderr or b'').decode(errors='replace')[-800:]}",
                          file=sys.stderr)
                    return 2
        out = work / "labs"
        out.mkdir()
        command = lab_command(args.workload, args.layout, policies, out)
        for round_number in range(args.rounds):
            order = versions if round_number % 2 == 0 else versions[::-1]
            for version in order:
                print(f"round {round_number + 1}/{args.rounds}: {version.name} ...", end=" ", flush=True)
                try:
                    cells = run_lab(version, command, out)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    print(f"FAILED: {exc}", file=sys.stderr)
                    return 1
                version.add(cells)
                print(", ".join(f"{c['policy']} {float(str(c['requests_per_s'])):.0f} req/s" for c in cells),
                      flush=True)
    first, second = versions
    table = comparison(first, second)
    stamp = report.timestamp()
    lines = [
        f"# {first.name} against {second.name}: {args.workload} {args.layout}, {stamp}",
        "",
        f"{args.rounds} rounds, each running the lab once on both versions (the order swapped every other "
        "round), from each version's own directory. Medians and ranges over the rounds; the last column "
        "pairs the rounds: the median of the second version's ratio (req/s) or difference (µs) to the "
        "first's in the same round.",
        "",
        table,
        "",
        "## Commands",
        "",
        "```",
        shlex.join([report.python(), "-m", "bench.ab", *(sys.argv[1:] if argv is None else argv)]),
        "# each round, from each version's directory:",
        shlex.join(lab_command(args.workload, args.layout, policies, Path("OUT"))),
        "```",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ab-{stamp}.md"
    path.write_text("\n".join(lines) + "\n")
    print()
    print(table)
    print(f"wrote {report.relative(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
