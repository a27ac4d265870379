"""WSGI apps (Flask, Django, ...): a2wsgi turns them into ASGI, served as ``worker.interfaces.asgi`` is.

a2wsgi runs each request on a pool thread of ``--threads`` (Python's default
size if not given), so an idle keep-alive connection holds no thread, and
streams request and response bodies through bounded queues; it calls
``close()`` on the response iterable. No WebSockets and no lifespan.
"""

from __future__ import annotations

import os
from typing import Any

from worker.interfaces.asgi import AsgiInterface


class WsgiInterface(AsgiInterface):
    name = "wsgi"
    wsgi = True

    def _asgi_app(self) -> Any:
        from a2wsgi import WSGIMiddleware

        # ThreadPoolExecutor's own default size.
        threads = self.context.threads or min(32, (os.cpu_count() or 1) + 4)
        self._wsgi = WSGIMiddleware(self.app.handler, workers=threads)
        return self._wsgi

    def close(self) -> None:
        super().close()
        # a2wsgi's pool (its one attribute we reach): threads still running a
        # request must not hold up the exit.
        self._wsgi.executor.shutdown(wait=False, cancel_futures=True)
