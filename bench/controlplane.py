"""What the control plane costs the hot path (``python -m bench.lab --control-plane``).

Two variants of W1 under round-robin (``examples.hello:handler``, 2
workers, a new connection per request) run alternately, plain, control,
plain, control, ..., a fresh dispatcher per run:

- ``plain``: pings off and no control socket (``--ping-interval 0
  --control none``), no metrics;
- ``control``: pings every second and metrics served (``--ping-interval 1
  --metrics 127.0.0.1:0``, a control socket, idle once the run starts), and
  a thread GETs ``/metrics`` once a second while wrk runs.

The table has a row per variant; the throughput difference of the medians
is checked against the goal (control at most 2 % slower), and each control
run is also compared with the plain run just before it. Written to
``bench/results/control-<UTC timestamp>.md``, with wrk's output and the
server logs beside it as ``.raw`` (not committed).
"""

from __future__ import annotations

import contextlib
import re
import shlex
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from bench import report, wrk
from bench.load import ask, http_get
from bench.matrix import RUN_ERRORS, Settings, server_args, workloads, wrk_command
from bench.proc import cpu_of, machine, process_cpu_s
from bench.report import table
from bench.server import SOCKET_POLL_S, START_TIMEOUT_S, Server, StartError
from bench.stats import spread
from bench.wrk import WrkResult

#: Variants of round-robin: name -> extra server arguments. Run in this order.
VARIANTS: dict[str, tuple[str, ...]] = {
    "plain": ("--ping-interval", "0", "--control", "none"),
    "control": ("--ping-interval", "1", "--metrics", "127.0.0.1:0"),
}
#: The variant whose /metrics is scraped while wrk runs.
SCRAPED_VARIANTS = frozenset({"control"})
#: Largest throughput loss of control vs plain (medians) the control plane may cost.
GOAL_PCT = 2.0
#: Seconds between scrapes of /metrics, and the bound on one scrape.
SCRAPE_INTERVAL_S = 1.0
SCRAPE_TIMEOUT_S = 2.0
_HELLO_PID = re.compile(r"hello from pid (\d+)")


class Scraper:
    """A thread that GETs ``url`` every ``interval_s`` while entered, counting successes and failures.

    A scrape fails on any error, a status other than 200, a timeout (``timeout_s``), or a body
    lacking ``dispatcher_scrape_error 0`` (the master's loop did not answer in time).
    """

    def __init__(self, url: str, interval_s: float = SCRAPE_INTERVAL_S,
                 timeout_s: float = SCRAPE_TIMEOUT_S) -> None:
        self.url = url
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []
        self.latencies_ms: list[float] = []
        self._stop = threading.Event()
        # No proxy from the environment: the request must go straight to 127.0.0.1.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._thread = threading.Thread(target=self._run, name="metrics-scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop and join; a scrape under way ends on its own timeout."""
        self._stop.set()
        self._thread.join(self.timeout_s + 5.0)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self._scrape()
            next_at += self.interval_s
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _scrape(self) -> None:
        started = time.monotonic()
        try:
            with self._opener.open(self.url, timeout=self.timeout_s) as response:
                status = response.status
                body = response.read().decode("utf-8", "replace")
        except (OSError, ValueError) as exc:  # URLError, HTTPError and timeouts are OSErrors
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        if status != 200:
            self._fail(f"HTTP {status}")
        elif not re.search(r"^dispatcher_scrape_error 0(\.0)?$", body, re.MULTILINE):
            self._fail("dispatcher_scrape_error is not 0")
        else:
            self.ok += 1
            self.latencies_ms.append((time.monotonic() - started) * 1e3)

    def _fail(self, reason: str) -> None:
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(reason)


@dataclass
class ControlRun:
    """One run of one variant."""

    variant: str
    repeat: int
    port: int
    wrk: WrkResult
    master_cpu_s: float
    workers_cpu_s: float
    wrk_output: str
    server_log: str
    exit_code: int | None
    #: Scrapes of /metrics during the wrk run: None when not scraped.
    scrapes_ok: int | None = None
    scrapes_failed: int = 0
    scrape_errors: list[str] = field(default_factory=list)
    scrape_p50_ms: float = float("nan")

    @property
    def master_us_per_conn(self) -> float:
        return self.master_cpu_s * 1e6 / self.wrk.requests if self.wrk.requests else float("nan")

    @property
    def workers_us_per_conn(self) -> float:
        return self.workers_cpu_s * 1e6 / self.wrk.requests if self.wrk.requests else float("nan")


def wait_serving(server: Server, workers: int, timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until each of ``workers`` workers of an ``examples.hello`` server has answered a GET.

    For ``plain``, whose lack of a control socket is what it measures, so
    there is nobody to ask: its port is read from the kernel (polled, as a
    socket appearing is no event to wait on) and its readiness from what it
    does. ``examples.hello`` names the pid that answered, and round-robin
    gives a new connection to a ready worker only, so once every worker has
    answered one, all are ready.

    Raises:
        StartError: the server exited, or not every worker answered within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    answered: set[int] = set()
    while len(answered) < workers:
        remaining = deadline - time.monotonic()
        if server.proc.poll() is not None or remaining <= 0:
            raise StartError(f"server {server.pid}: {len(answered)} of {workers} worker(s) answered, "
                             f"exit code {server.proc.poll()}; log:\n{server.log}")
        if not server.port:
            listening = server.listening_sockets()
            server.address = listening[0] if listening else ""
            server.port = int(server.address.rsplit(":", 1)[1]) if listening else 0
        pid = None
        if server.port:
            with contextlib.suppress(OSError):  # a connection refused or reset while it starts
                pid = _HELLO_PID.search(ask(server.port, http_get(server.port), timeout=remaining))
        if pid is None:
            time.sleep(SOCKET_POLL_S)
        else:
            answered.add(int(pid.group(1)))


def run_variant(settings: Settings, variant: str, repeat: int) -> ControlRun:
    """Start a server of ``variant``, load it with wrk (scraping it if it is scraped), stop it.

    Raises:
        StartError: the server did not get ready.
        RuntimeError, ValueError, subprocess.SubprocessError: wrk failed.
    """
    w1 = workloads(settings)["W1"]
    server = Server(*server_args(settings, w1, "round-robin"), *VARIANTS[variant], workers=w1.workers)
    scraper: Scraper | None = None
    try:
        if server.control_path is None:
            wait_serving(server, w1.workers)
        else:
            server.start()
        if variant in SCRAPED_VARIANTS:
            scraper = Scraper(f"http://{server.metrics_address()}/metrics")
        pids = dict(enumerate(server.worker_pids()))
        master_before, workers_before = process_cpu_s(server.pid), cpu_of(pids)
        result, output = wrk.run(wrk_command(settings, w1, server.port), settings.duration_s, scraper)
        master_after, workers_after = process_cpu_s(server.pid), cpu_of(pids)
    finally:
        server.stop()
    run = ControlRun(
        variant=variant, repeat=repeat, port=server.port, wrk=result,
        master_cpu_s=master_after - master_before,
        workers_cpu_s=sum(workers_after.values()) - sum(workers_before.values()),
        wrk_output=output, server_log=server.log, exit_code=server.exit_code,
    )
    if scraper is not None:
        run.scrapes_ok, run.scrapes_failed, run.scrape_errors = scraper.ok, scraper.failed, scraper.errors
        if scraper.latencies_ms:
            run.scrape_p50_ms = statistics.median(scraper.latencies_ms)
    return run


# The report


def summary_table(runs: list[ControlRun]) -> str:
    """One row per variant: medians (min-max), and the scrapes."""
    rows = []
    for variant in VARIANTS:
        mine = [r for r in runs if r.variant == variant]
        if not mine:
            continue
        scraped = [r for r in mine if r.scrapes_ok is not None]
        scrapes = (f"{sum(r.scrapes_ok or 0 for r in scraped)}/{sum(r.scrapes_failed for r in scraped)}"
                   if scraped else "-")
        rows.append([
            variant,
            spread((r.wrk.requests_per_s for r in mine), ".0f"),
            spread((r.wrk.p50_ms for r in mine), ".2f"),
            spread((r.wrk.p99_ms for r in mine), ".2f"),
            spread((r.master_us_per_conn for r in mine), ".1f"),
            spread((r.workers_us_per_conn for r in mine), ".1f"),
            scrapes,
            spread((float(r.wrk.errors) for r in mine), ".0f"),
        ])
    return table(["variant", "req/s", "p50 ms", "p99 ms", "master µs/conn", "workers µs/conn",
                  "scrapes ok/failed", "errors"], rows)


def cost(runs: list[ControlRun]) -> str:
    """Throughput of control vs plain, in percent: of the medians (checked against the goal),
    and the median of the per-repeat pairs (each control run against the plain run before it)."""
    plain = {r.repeat: r.wrk.requests_per_s for r in runs if r.variant == "plain"}
    control = {r.repeat: r.wrk.requests_per_s for r in runs if r.variant == "control"}
    if not plain or not control:
        return "control vs plain throughput: n/a (both variants must run)"
    diff = 100 * (statistics.median(control.values()) / statistics.median(plain.values()) - 1)
    pairs = [100 * (control[k] / plain[k] - 1) for k in sorted(plain.keys() & control.keys())]
    paired = f"; median of {len(pairs)} paired repeats {statistics.median(pairs):+.1f} %" if pairs else ""
    verdict = "met" if -diff < GOAL_PCT else "NOT met"
    return (f"control vs plain throughput (medians): {diff:+.1f} %{paired} "
            f"(goal: < {GOAL_PCT:g} % slower: {verdict})")


def runs_table(runs: list[ControlRun]) -> str:
    rows = [
        [n, r.variant, r.port, r.wrk.requests, f"{r.wrk.requests_per_s:.0f}", f"{r.wrk.p50_ms:.2f}",
         f"{r.wrk.p99_ms:.2f}", f"{r.master_cpu_s:.2f}", f"{r.master_us_per_conn:.1f}",
         f"{r.workers_us_per_conn:.1f}", "/".join(str(v) for v in r.wrk.socket_errors.values()),
         r.wrk.non_2xx, r.exit_code]
        for n, r in enumerate(runs, 1)
    ]
    return table(["#", "variant", "port", "requests", "req/s", "p50 ms", "p99 ms", "master CPU s",
                  "master µs/conn", "workers µs/conn", "socket errors c/r/w/t", "non-2xx", "exit"], rows)


def _document(settings: Settings, repeats: int, runs: list[ControlRun], stamp: str) -> str:
    w1 = workloads(settings)["W1"]
    python = report.python()
    args = server_args(settings, w1, "round-robin")
    servers = [f"{report.server_command(*args, *extra, workers=w1.workers)}  # {name}"
               for name, extra in VARIANTS.items()]
    scrape_notes = [
        f"- run {n} ({r.variant}, repeat {r.repeat + 1}): {r.scrapes_failed} failed scrape(s): "
        + "; ".join(r.scrape_errors)
        for n, r in enumerate(runs, 1) if r.scrapes_failed
    ]
    scrape_ms = [r.scrape_p50_ms for r in runs if r.scrapes_ok]
    lines = [
        f"# Control-plane cost, {stamp}",
        "",
        f"{repeats} repeat(s) x {len(VARIANTS)} variants of round-robin on W1 ({w1.title}), "
        f"{settings.duration_s} s each; each repeat runs {', '.join(VARIANTS)} in that order, a fresh "
        "server per run. plain: pings off, no control socket, no metrics. control: pings every 1 s, a "
        "control socket (asked `ready` at the start, then idle), and /metrics GET every "
        f"{SCRAPE_INTERVAL_S:g} s during the wrk run (urllib, {SCRAPE_TIMEOUT_S:g} s timeout; a scrape "
        "fails on an error, a non-200 or `dispatcher_scrape_error` not 0). Cells: median (min"
        "\N{EN DASH}max). master µs/conn = master CPU (user + system, /proc/PID/task/*/schedstat) during "
        "the wrk run / requests wrk completed; workers µs/conn = the workers' CPU likewise. errors = wrk "
        "socket errors + non-2xx/3xx responses. The paired figure compares each repeat's control run "
        "with the plain run just before it.",
        "",
        summary_table(runs),
        "",
        cost(runs),
        "",
        *([f"Scrape round trip (median per run, median of runs): {statistics.median(scrape_ms):.1f} ms", ""]
          if scrape_ms else []),
        *([*scrape_notes, ""] if scrape_notes else []),
        "## Machine",
        "",
        *machine(settings.wrk),
        "",
        "## Commands",
        "",
        "From the repository root, per run. DIR is a private temporary directory; control's PORT is "
        f"the one `{python} -m dispatcher ctl --control DIR/ctl.sock ready` reports, and MPORT the "
        "master's other listening socket; plain's PORT is its one listening socket, and it counts as "
        "ready once both workers have answered a GET.",
        "",
        "```",
        *servers,
        shlex.join(wrk_command(settings, w1, "PORT")),
        "```",
        "",
        f"Lab: `{shlex.join([python, '-m', 'bench.lab', *sys.argv[1:]])}`",
        "",
        "## Runs",
        "",
        runs_table(runs),
    ]
    return "\n".join(lines) + "\n"


def run(settings: Settings, repeats: int, out: Path, stamp: str) -> int:
    """Run the variants ``repeats`` times, print the table, write the report; return the exit status."""
    runs: list[ControlRun] = []
    total = repeats * len(VARIANTS)
    try:
        for repeat in range(repeats):
            for variant in VARIANTS:
                print(f"[{len(runs) + 1}/{total}] {variant} (repeat {repeat + 1}) ...", end=" ", flush=True)
                r = run_variant(settings, variant, repeat)
                runs.append(r)
                scraped = ""
                if r.scrapes_ok is not None:
                    scraped = f", scrapes {r.scrapes_ok} ok/{r.scrapes_failed} failed"
                    scraped += f" ({r.scrape_errors[0]})" if r.scrape_errors else ""
                print(f"{r.wrk.requests_per_s:.0f} req/s, p99 {r.wrk.p99_ms:.2f} ms, master "
                      f"{r.master_us_per_conn:.1f} µs/conn, errors {r.wrk.errors}{scraped}", flush=True)
    except RUN_ERRORS as exc:
        print(f"\nrun failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"control-{stamp}.md"
    path.write_text(_document(settings, repeats, runs, stamp))
    with path.with_suffix(".raw").open("w") as raw:
        for n, r in enumerate(runs, 1):
            scraped = "" if r.scrapes_ok is None else f", scrapes {r.scrapes_ok} ok/{r.scrapes_failed} failed"
            raw.write(f"===== run {n}: {r.variant}, repeat {r.repeat + 1}, port {r.port}{scraped} =====\n")
            raw.write(r.wrk_output)
            raw.write("----- server log -----\n")
            raw.write(r.server_log)
    print(f"\n{summary_table(runs)}\n\n{cost(runs)}\n\nwrote {report.relative(path)} (and .raw)")
    return 0
