"""Readiness as a cached state: health checks read it, one background task refreshes it.

A health check that probed the backend itself would cost a real inference per call and per
model — free to anyone, since health needs no key — and under load the probe would wait
behind big batches, time out and flip readiness, turning overload into an outage. So:

- every :data:`REFRESH_INTERVAL_S` one task probes the served versions, one probe at a
  time, each within :data:`PROBE_TIMEOUT_S` (past it: not ready);
- a version that answered a request since the last refresh needs no probe: real traffic
  answered is the best proof it answers;
- a version not probed yet (just loaded, so its backend just accepted it) counts as ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable

from .backends import Backend
from .model_manager import ServedVersion

logger = logging.getLogger(__name__)

#: Seconds between two refreshes: how stale readiness may be, besides the probes' own time.
REFRESH_INTERVAL_S = 2.0
#: Seconds one probe may take before its version counts as not ready.
PROBE_TIMEOUT_S = 5.0


class ReadinessCache:
    """Each served version's last probe result; see the module docstring."""

    def __init__(self, backend: Backend, versions: Callable[[], list[ServedVersion]]) -> None:
        self._backend = backend
        self._versions = versions
        self._ready: weakref.WeakKeyDictionary[ServedVersion, bool] = weakref.WeakKeyDictionary()
        self._last_refresh_ms = 0
        self._task: asyncio.Task[None] | None = None

    def ready(self, served: ServedVersion) -> bool:
        """The version's last known readiness (a dictionary read)."""
        return self._ready.get(served, True)

    def start(self) -> None:
        """Refresh in the background until :meth:`stop`."""
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def stop(self) -> None:
        """Stop refreshing (a probe under way is cancelled)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def refresh(self) -> None:
        """Probe every served version that answered no request since the last refresh, one
        at a time."""
        since_ms, self._last_refresh_ms = self._last_refresh_ms, time.time_ns() // 1_000_000
        for served in self._versions():
            if served.stats.snapshot().last_inference >= since_ms > 0:
                ready = True
            else:
                ready = await self._probe(served)
            if ready != self._ready.get(served, True):
                logger.warning(
                    "%s v%s is %s", served.name, served.version, "ready" if ready else "NOT ready"
                )
            self._ready[served] = ready

    async def _probe(self, served: ServedVersion) -> bool:
        try:
            return await asyncio.wait_for(self._backend.ready(served.model), PROBE_TIMEOUT_S)
        except TimeoutError:
            logger.warning(
                "%s v%s: readiness probe took over %.0f s",
                served.name,
                served.version,
                PROBE_TIMEOUT_S,
            )
        except Exception:
            logger.exception("%s v%s: readiness probe failed", served.name, served.version)
        return False

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_INTERVAL_S)
            await self.refresh()
