"""A Flask app the web integration tests serve (``tests/test_web_wsgi.py``).

``/stream?gate=PATH&closed=PATH`` answers with an iterable that yields its
first chunk, then waits until ``gate`` exists (bounded) before the rest: a
client that gets the first chunk before it opens the gate has seen the body
streamed. The iterable's ``close()`` writes ``closed``, the event the test
waits for. ``/upload`` reads ``wsgi.input`` in chunks and answers with the
size and sha256 of what it read.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from flask import Flask, Response, request

#: How long ``/stream`` waits for its gate at most.
GATE_TIMEOUT_S = 15.0
READ_SIZE = 65536

app = Flask(__name__)


class Chunks:
    """A response body: ``count`` lines, the first before the gate, ``close()`` leaving a marker."""

    def __init__(self, count: int, gate: Path, closed: Path) -> None:
        self.count = count
        self.gate = gate
        self.closed = closed

    def __iter__(self) -> Iterator[bytes]:
        yield f"chunk 0 from {os.getpid()}\n".encode()
        deadline = time.monotonic() + GATE_TIMEOUT_S
        # A file appearing is no event a WSGI thread can wait on: look again, bounded.
        while not self.gate.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        for n in range(1, self.count):
            yield f"chunk {n}\n".encode()

    def close(self) -> None:
        self.closed.write_text("closed\n")


@app.get("/")
def index() -> dict[str, object]:
    return {"pid": os.getpid(), "script_name": request.environ.get("SCRIPT_NAME", "")}


@app.get("/stream")
def stream() -> Response:
    args = request.args
    body = Chunks(int(args.get("count", "5")), Path(args["gate"]), Path(args["closed"]))
    return Response(body, mimetype="text/plain")


@app.post("/upload")
def upload() -> dict[str, object]:
    stream = request.environ["wsgi.input"]
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(READ_SIZE):
        digest.update(chunk)
        size += len(chunk)
    return {"pid": os.getpid(), "bytes": size, "sha256": digest.hexdigest()}
