"""A Flask app (WSGI) on the round-robin hand-off, each request on a worker's thread pool.

    python -m dispatcher --app examples.flask_app:app --workers 4 --threads 8

``GET /`` says which worker answered; ``GET /stream`` streams its answer in
chunks, as a generator.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from flask import Flask, Response

app = Flask(__name__)


@app.get("/")
def hello() -> dict[str, object]:
    return {"hello": "world", "worker_pid": os.getpid()}


@app.get("/stream")
def stream() -> Response:
    def chunks() -> Iterator[str]:
        for n in range(5):
            yield f"chunk {n}\n"

    return Response(chunks(), mimetype="text/plain")
