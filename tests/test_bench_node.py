"""The lab's Node.js peer: ``bench/node_cluster.js`` under both scheduling policies (``bench.node_peer``).

Started as the lab starts it, it must print its port and pids once every
worker listens, answer what ``bench.apps:light`` answers, and leave no
process behind once stopped.
"""

from __future__ import annotations

import socket
import time

import psutil
import pytest

from bench.node_peer import NodeCluster, find_node, parse_ready

NODE = find_node()
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"


def test_the_listening_line_gives_the_port_and_every_pid() -> None:
    assert parse_ready("listening 127.0.0.1:40123 pids 100,101,102\n") == (40123, [100, 101, 102])
    with pytest.raises(ValueError):
        parse_ready("listening 0.0.0.0:40123 pids 100,101")
    with pytest.raises(ValueError):
        parse_ready("Debugger listening on ws://127.0.0.1:9229")


def _get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\n")  # the head in two parts: the worker waits for it
        time.sleep(0.05)
        sock.sendall(b"Connection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return answer


@pytest.mark.skipif(NODE is None, reason="needs node")
@pytest.mark.parametrize("mode", ["rr", "none"])
def test_node_cluster_serves_the_light_answer_and_stops_every_process(mode: str) -> None:
    assert NODE is not None
    cluster = NodeCluster(mode, 2, node=NODE)
    try:
        cluster.start(timeout=20)
        processes = [psutil.Process(pid) for pid in cluster.pids()]
        assert len(processes) == 3
        assert {p.ppid() for p in processes[1:]} == {cluster.pid}  # the workers are the primary's
        assert 0 < cluster.port < 65536
        assert _get(cluster.port) == ANSWER
        assert _get(cluster.port) == ANSWER
    finally:
        code = cluster.stop()
    assert code == 0, cluster.log
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive
