"""``--proxy-protocol`` end to end: ``python -m dispatcher`` serving ASGI and WSGI apps.

The test client connects from 127.0.0.1 (trusted by default) and sends a v2 header naming another
client: the app and the access log name that one. An untrusted peer's header is the app's data; a
trusted peer without a header is closed, with one log line.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct

from bench.server import HOST, Server
from shared.proxy_protocol import V2_SIGNATURE

TIMEOUT_S = 10.0
REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"


def v2(host: str, port: int) -> bytes:
    block = ipaddress.IPv4Address(host).packed + ipaddress.IPv4Address("192.0.2.1").packed
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 12) + block + struct.pack("!HH", port, 443)


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection((HOST, port), timeout=TIMEOUT_S) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def client_seen(answer: bytes) -> list[object]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    return list(json.loads(body)["client"])


def test_asgi_sees_the_headers_client_and_a_trusted_peer_needs_a_header(server_factory: type[Server]) -> None:
    server = server_factory("--app", "tests.apps.proxied:asgi", "--proxy-protocol", workers=1).start()
    assert client_seen(exchange(server.port, v2("203.0.113.7", 4711) + REQUEST)) == ["203.0.113.7", 4711]
    server.wait_line(r'203\.0\.113\.7:4711 - "GET / HTTP/1\.1" 200')
    # From 127.0.0.1, allowed: a connection without a header is closed unanswered, with one line.
    assert exchange(server.port, REQUEST) == b""
    assert exchange(server.port, REQUEST) == b""
    server.wait_line(r"closed a connection from 127\.0\.0\.1:\d+ with no valid PROXY protocol header")
    server.sync_log()
    assert server.log.count("no valid PROXY protocol header") == 1


def test_an_untrusted_peers_header_is_not_trusted(server_factory: type[Server]) -> None:
    server = server_factory("--app", "tests.apps.proxied:asgi", "--proxy-protocol",
                            "--forwarded-allow-ips", "10.9.9.9", workers=1).start()
    # The header is the start of the request as far as the server knows: uvicorn answers 400.
    answer = exchange(server.port, v2("203.0.113.7", 4711) + REQUEST)
    assert b"203.0.113.7" not in answer and answer.startswith(b"HTTP/1.1 400"), answer
    # Without one, served as any client.
    assert client_seen(exchange(server.port, REQUEST))[0] == "127.0.0.1"


def test_wsgi_remote_addr_with_the_worker_accepting_itself(server_factory: type[Server]) -> None:
    server = server_factory("--app", "tests.apps.proxied:wsgi", "--interface", "wsgi", "--proxy-protocol",
                            "--policy", "reuseport", workers=1).start()
    assert client_seen(exchange(server.port, v2("198.51.100.9", 5150) + REQUEST)) == ["198.51.100.9", 5150]
    assert client_seen(exchange(server.port, b"PROXY TCP4 198.51.100.10 192.0.2.1 6000 443\r\n" + REQUEST)) \
        == ["198.51.100.10", 6000]
