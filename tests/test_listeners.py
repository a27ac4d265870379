"""Parsing and binding ``--bind`` specs."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dispatcher.listeners import BindError, open_listener, parse_bind


@pytest.mark.parametrize(
    ("text", "host", "port", "path"),
    [
        ("127.0.0.1:8000", "127.0.0.1", 8000, None),
        (":9000", "0.0.0.0", 9000, None),
        ("[::1]:0", "::1", 0, None),
        ("localhost:80", "localhost", 80, None),
        ("unix:/run/app.sock", None, None, "/run/app.sock"),
    ],
)
def test_parse(text: str, host: str | None, port: int | None, path: str | None) -> None:
    spec = parse_bind(text)
    assert (spec.host, spec.port, spec.path) == (host, port, path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8000", "expected HOST:PORT"),
        ("127.0.0.1:http", "is not a number"),
        ("127.0.0.1:70000", "from 0 to 65535"),
        ("::1:80", "in brackets"),
        ("[::1]80", r"expected \[IPV6\]:PORT"),
        ("unix:", "empty Unix socket path"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(BindError, match=message):
        parse_bind(text)


def test_port_zero_reports_the_real_port() -> None:
    listener = open_listener(parse_bind("127.0.0.1:0"), 16)
    try:
        port = listener.sock.getsockname()[1]
        assert port != 0 and listener.address == f"127.0.0.1:{port}"
    finally:
        listener.close()


def test_unix_socket_stale_file_replaced_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "s"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    listener = open_listener(parse_bind(f"unix:{path}"), 16)
    try:
        with pytest.raises(BindError, match="another server is listening"):
            open_listener(parse_bind(f"unix:{path}"), 16)
    finally:
        listener.close()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(BindError, match="is not a socket"):
        open_listener(parse_bind(f"unix:{path}"), 16)


def test_reuseport_refuses_unix() -> None:
    with pytest.raises(BindError, match="Unix"):
        open_listener(parse_bind("unix:/tmp/x.sock"), 16, reuseport=True)
