"""Settings: checked once, in ``Config``; the command line takes its defaults from it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from bench.server import ROOT
from dispatcher.cli import config_from_args
from dispatcher.config import Config
from shared import protocol


def test_the_window_is_at_most_one_handoffs_worth_of_fds() -> None:
    assert Config(app="a:b", window=protocol.MAX_FDS).window == 64
    for bad in (0, 65):
        with pytest.raises(ValueError, match="--window must be 1 to 64"):
            Config(app="a:b", window=bad)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ping_interval_s": 2.0, "ping_timeout_s": 2.0},
         "--ping-timeout must be longer than --ping-interval"),
        ({"max_requests_jitter": -1}, "--max-requests-jitter must not be negative"),
        ({"workers": 0}, "--workers must be at least 1"),
        ({"reload_batch": 0}, "--reload-batch must be at least 1"),
        ({"threads": 0}, "--threads must be at least 1"),
        ({"max_pending": 0}, "--max-pending must be at least 1"),
        ({"boot_timeout_s": -1.0}, "--boot-timeout must not be negative"),
        ({"drain_delay_s": -0.5}, "--drain-delay must not be negative"),
        ({"max_memory": -1}, "--max-memory must not be negative"),
    ],
)
def test_settings_that_contradict_each_other_are_refused(settings: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Config(app="a:b", **settings)  # type: ignore[arg-type]


def test_a_config_does_not_change_while_the_master_runs() -> None:
    config = Config(app="a:b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers = 4  # type: ignore[misc]


def test_no_pings_needs_no_ping_timeout() -> None:
    assert Config(app="a:b", ping_interval_s=0, ping_timeout_s=0).ping_timeout_s == 0


def test_the_command_line_defaults_are_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    monkeypatch.delenv("LISTEN_PID", raising=False)
    parsed = config_from_args(["--app", "a:b"])
    # workers: the command line's default is the machine's (WEB_CONCURRENCY, or its CPUs).
    assert parsed == dataclasses.replace(Config(app="a:b"), workers=3)


def test_the_drain_delay_is_read_in_seconds() -> None:
    assert config_from_args(["--app", "a:b", "--workers", "1", "--drain-delay", "2.5"]).drain_delay_s == 2.5
    assert Config(app="a:b").drain_delay_s == 0


def test_the_web_options_reach_the_workers_as_given() -> None:
    from dispatcher.master import _worker_args
    from shared.web_options import WebOptions

    config = config_from_args(["--app", "a:b", "--workers", "1", "--interface", "asgi", "--factory",
                               "--root-path", "/api", "--no-proxy-headers",
                               "--forwarded-allow-ips", "10.0.0.1",
                               "--timeout-keep-alive", "7", "--limit-concurrency", "9", "--no-access-log",
                               "--http", "h11", "--ws", "wsproto", "--lifespan", "on"])
    web = WebOptions(root_path="/api", proxy_headers=False, forwarded_allow_ips="10.0.0.1",
                     timeout_keep_alive=7, limit_concurrency=9, access_log=False, http="h11", ws="wsproto",
                     lifespan="on")
    assert config.web == web
    args = _worker_args(config)
    assert args[args.index("--interface") + 1] == "asgi" and "--factory" in args
    assert WebOptions.from_json(args[args.index("--web") + 1]) == web


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--window", "65"], "--window must be 1 to 64"),
        (["--ping-interval", "5", "--ping-timeout", "2"],
         "--ping-timeout must be longer than --ping-interval"),
        (["--max-requests-jitter", "-3"], "--max-requests-jitter must not be negative"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--reload-batch", "0"], "--reload-batch must be at least 1"),
        (["--graceful-timeout", "-1"], "--graceful-timeout must not be negative"),
        (["--drain-delay", "-1"], "--drain-delay must not be negative"),
        (["--ping-timeout", "nan"], "--ping-timeout must not be negative"),
        (["--limit-concurrency", "0"], "--limit-concurrency must be at least 1"),
        (["--timeout-keep-alive", "-1"], "--timeout-keep-alive must not be negative"),
        (["--root-path", "api"], "--root-path must start with '/', not 'api'"),
        (["--ssl-keyfile", "/etc/hostname"], "--ssl-keyfile needs --ssl-certfile"),
        (["--ssl-certfile", "/no/such/cert.pem"], "--ssl-certfile '/no/such/cert.pem' cannot be read"),
        (["--interface", "rsgi"], "argument --interface: invalid choice: 'rsgi' (choose from 'auto', "
         "'asgi', 'wsgi', 'streams', 'blocking', 'server')"),
    ],
)
def test_a_bad_setting_is_one_usage_line(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "dispatcher", "--app", "a:b", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"python -m dispatcher: error: {message}"
