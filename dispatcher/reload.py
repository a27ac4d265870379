"""Rolling reload: every worker replaced by a fresh process running the code on disk, a batch at a time.

For each slot a successor is started (``Supervisor.replace``); it serves as
soon as it is ready, and only then is the old worker told to drain, so
capacity never drops and nothing is lost. Batches go one after the other
(``--reload-batch`` slots each); a batch whose successor fails to boot, or
is not ready within the boot timeout, stops the reload there: the workers
not replaced yet keep serving the old code, and the error says which
worker and why. One reload runs at a time; asking again while one runs
waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from dispatcher.supervisor import Supervisor

log = logging.getLogger(__name__)


class Reload:
    """Rolling reloads of ``supervisor``'s workers.

    Parameters:
        batch: slots replaced at a time.
        boot_timeout_s: how long each batch's successors may take to be ready.
    """

    def __init__(self, supervisor: Supervisor, batch: int, boot_timeout_s: float) -> None:
        self._supervisor = supervisor
        self._batch = batch
        self._boot_timeout_s = boot_timeout_s
        self._task: asyncio.Task[str | None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def run(self) -> str | None:
        """Reload every worker (or wait for the reload under way).

        Returns:
            None when every worker was replaced, else why the reload stopped
            (the workers not replaced yet keep serving).
        """
        if self._supervisor.stopping:
            return "the master is stopping"
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._reload_all())
        assert self._task is not None
        return await asyncio.shield(self._task)

    async def _reload_all(self) -> str | None:
        supervisor, batch, timeout_s = self._supervisor, self._batch, self._boot_timeout_s
        started = time.monotonic()
        ids = [slot.id for slot in supervisor.slots]
        log.info("reload: replacing %d worker(s), %d at a time", len(ids), batch)
        for first in range(0, len(ids), batch):
            group = [slot for slot in (supervisor.slots.get(i) for i in ids[first:first + batch]) if slot]
            futures = [supervisor.replace(slot, "reload") for slot in group]
            done, waiting = await asyncio.wait(futures, timeout=timeout_s)
            errors = [f.result() for f in done if f.result() is not None]
            for slot, future in zip(group, futures, strict=True):
                if future in waiting and slot.successor is not None:
                    errors.append(f"worker {slot.id} not ready within {timeout_s:g} s")
                    supervisor.kill(slot.successor, "not ready in time for the reload")
            if errors:
                error = "; ".join(str(e) for e in errors)
                log.error("reload stopped after %d of %d worker(s): %s", first, len(ids), error)
                return error
        log.info("reload: %d worker(s) replaced in %.1f s", len(ids), time.monotonic() - started)
        return None
