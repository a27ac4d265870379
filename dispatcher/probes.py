"""Liveness and readiness probes: ``/healthz`` and ``/readyz`` on the admin HTTP listener.

For a load balancer's or an orchestrator's health checks, polled every
second or so, so each is one small function on the master's loop (never a
snapshot of every worker):

- ``/healthz``: 200 ``ok`` while the master's event loop runs. The answer
  comes from the loop itself (``dispatcher.threadsafe.call_on_loop`` of a
  function that does nothing), so a master stuck in a callback fails it:
  503, with the reason, once ``timeout_s`` has passed.
- ``/readyz``: 200 ``ready`` while the master would serve a new connection
  (at least one worker ready, not stopping, not in its drain delay); else
  503 with the reason the master's readiness function gives (``no worker is
  ready``, ``stopping``, ``draining for 5 s before stopping``), or the
  healthz reason when the loop does not answer.

Bodies are plain text, one line; every answer says ``Cache-Control:
no-store``, so no proxy between the checker and the master answers from a
cache. ``Probes.around`` puts both in front of another WSGI app (the
metrics one), which keeps every other path. They are answered to anyone who
can reach the listener: it is meant for a private address.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from dispatcher.threadsafe import LoopUnavailable, call_on_loop

#: Why the master is not ready for new connections, or None when it is; called on its loop.
Readiness = Callable[[], str | None]

#: How long a probe waits for the master's loop: short, a checker polls often.
DEFAULT_TIMEOUT_S = 1.0

PATHS = ("/healthz", "/readyz")

_STATUS = {200: "200 OK", 405: "405 Method Not Allowed", 503: "503 Service Unavailable"}


class Probes:
    """Answers ``/healthz`` and ``/readyz`` from ``loop``, on the HTTP server's threads.

    Parameters:
        loop: the master's event loop.
        readiness: run on ``loop``: None when ready, else why not.
        timeout_s: how long a probe waits for ``loop`` before it answers 503.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, readiness: Readiness,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._loop = loop
        self._readiness = readiness
        self.timeout_s = timeout_s

    def healthz(self) -> tuple[int, str]:
        """(status, body): 200 if the loop ran a no-op within the timeout, else 503 and why not."""
        try:
            call_on_loop(self._loop, _nothing, self.timeout_s)
        except LoopUnavailable as exc:
            return 503, str(exc)
        return 200, "ok"

    def readyz(self) -> tuple[int, str]:
        """(status, body): 200 if the readiness function says ready, else 503 and its reason."""
        try:
            reason = call_on_loop(self._loop, self._readiness, self.timeout_s)
        except LoopUnavailable as exc:
            return 503, str(exc)
        except Exception as exc:  # a bug, but a probe still answers
            return 503, f"readiness check failed: {exc!r}"
        return (200, "ready") if reason is None else (503, reason)

    def around(self, app: WSGIApplication) -> WSGIApplication:
        """A WSGI app answering the probe paths here and every other path with ``app``."""
        answers = {"/healthz": self.healthz, "/readyz": self.readyz}

        def dispatch(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            probe = answers.get(environ.get("PATH_INFO", ""))
            if probe is None:
                return app(environ, start_response)
            method = environ.get("REQUEST_METHOD", "GET")
            if method not in ("GET", "HEAD"):
                return _answer(start_response, 405, f"{method}: use GET or HEAD", head=False,
                               extra=[("Allow", "GET, HEAD")])
            status, body = probe()
            return _answer(start_response, status, body, head=method == "HEAD")

        return dispatch


def _nothing() -> None:
    """What ``/healthz`` has the loop run: that it runs at all is the answer."""


def _answer(start_response: StartResponse, status: int, text: str, head: bool,
            extra: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    body = f"{text}\n".encode()
    start_response(_STATUS[status], [
        ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"), *extra,
    ])
    return [] if head else [body]
