"""The settings of the ASGI and WSGI interfaces, named and meant as uvicorn's.

The master checks them once (``check``) and passes them to each worker as one
JSON argument; the worker gives them to uvicorn (``worker.uvicorn_adapter``).
They mean nothing to the streams, blocking and custom-server interfaces,
except ``forwarded_allow_ips``, which also says whose PROXY protocol header
is trusted (``--proxy-protocol``, ``shared.allow_ips``), whatever the interface.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

HTTP_CHOICES = ("auto", "h11", "httptools")
WS_CHOICES = ("auto", "none", "websockets", "websockets-sansio", "wsproto")
LIFESPAN_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class WebOptions:
    """What ``--root-path`` and the other uvicorn-named options ask for (``--help`` has their meaning)."""

    root_path: str = ""
    proxy_headers: bool = True
    #: None: ``$FORWARDED_ALLOW_IPS``, else 127.0.0.1 and ::1 (as uvicorn).
    forwarded_allow_ips: str | None = None
    timeout_keep_alive: int = 5
    limit_concurrency: int | None = None
    access_log: bool = True
    http: str = "auto"
    ws: str = "auto"
    lifespan: str = "auto"
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None

    def check(self) -> None:
        """Raise ValueError naming the option, as the command line spells it, that is wrong."""
        for option, value, choices in (("--http", self.http, HTTP_CHOICES), ("--ws", self.ws, WS_CHOICES),
                                       ("--lifespan", self.lifespan, LIFESPAN_CHOICES)):
            if value not in choices:
                raise ValueError(f"{option} must be one of {', '.join(choices)}, not {value!r}")
        if self.timeout_keep_alive < 0:
            raise ValueError("--timeout-keep-alive must not be negative")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise ValueError("--limit-concurrency must be at least 1")
        if self.root_path and not self.root_path.startswith("/"):
            raise ValueError(f"--root-path must start with '/', not {self.root_path!r}")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("--ssl-keyfile needs --ssl-certfile")
        for option, path in (("--ssl-certfile", self.ssl_certfile), ("--ssl-keyfile", self.ssl_keyfile)):
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"{option} {path!r} cannot be read")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WebOptions:
        fields: dict[str, Any] = json.loads(text)
        return cls(**fields)
