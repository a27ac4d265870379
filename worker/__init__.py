"""The worker side of dispatcher: the runtime and the API for custom servers."""

from worker.api import Worker, current

__all__ = ["Worker", "current"]
