"""The gateway's one bounded pool of worker threads for caller-sized work.

Whatever a caller can make big — decoding images, decoding large messages, preparing and
post-processing big arrays — runs here instead of on the event loop (where it would stall every
other caller, health checks included). The pool is bounded (``settings.decode_threads``), unlike
asyncio's default executor (``cpu_count + 4`` threads), so the memory such work holds at one
moment is bounded too: at most that many decodes run at once, the others wait their turn holding
only the bytes they arrived with.

One pool per data plane (:attr:`cnnserve.gateway.dataplane.DataPlane.decode_pool`); transports
reach it there.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

#: Worker threads' name prefix (seen in py-spy, gdb, /proc/<pid>/task/*/comm).
THREAD_NAME_PREFIX = "cnnserve-decode"


class DecodePool:
    """At most ``threads`` functions run at once in worker threads; see the module docstring."""

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"a decode pool needs at least one thread, got {threads}")
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in a worker thread (with the caller's context variables, as
        :func:`asyncio.to_thread`), once a thread is free."""
        if self._executor is None:
            # Made on first use, so a pool closed by a stopped data plane serves again when
            # the data plane starts again.
            self._executor = ThreadPoolExecutor(self.threads, THREAD_NAME_PREFIX)
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        """Let the threads end once their current work is done; queued work is dropped."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
