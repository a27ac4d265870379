"""The comparison's WSGI app: Flask, the same paths and header as ``bench.asgi_app``.

    python -m gunicorn -k gthread -w 2 --threads 4 bench.wsgi_app:app ...
    python -m dispatcher --app bench.wsgi_app:app --interface wsgi --threads 4 ...

``/`` hello, ``/cpu`` 2 ms of CPU, ``/sleep`` ``time.sleep(1)`` (a thread
held, as blocking code holds it), ``/nodelay`` the ``TCP_NODELAY`` probe;
every answer carries ``x-worker: <pid>``. Flask, because it is what a WSGI
comparison is usually run with: the framework's cost is the same in every
server here.
"""

from __future__ import annotations

import time

from flask import Flask, Response, request

from bench.peer_probe import PID, SLEEP_S, WORKER_HEADER, burn_cpu, mark_ready, tcp_nodelay

app = Flask(__name__)

mark_ready()


def _answer(body: str) -> Response:
    return Response(body, mimetype="text/plain", headers={WORKER_HEADER: str(PID)})


@app.route("/")
def hello() -> Response:
    return _answer("hello")


@app.route("/cpu")
def cpu() -> Response:
    burn_cpu()
    return _answer("hello")


@app.route("/sleep")
def sleep() -> Response:
    time.sleep(SLEEP_S)
    return _answer("hello")


@app.route("/nodelay")
def nodelay() -> Response:
    # Only gunicorn puts the client's port in the environ; without it, every accepted socket is read.
    port = request.environ.get("REMOTE_PORT")
    peer = (str(request.environ.get("REMOTE_ADDR")), int(port)) if port else None
    server_port = request.environ.get("SERVER_PORT")
    return _answer(tcp_nodelay(peer, int(server_port) if server_port else None))
