"""The decode pool runs at most its thread count at once, and serves again after close."""

from __future__ import annotations

import asyncio
import threading
import time

from cnnserve.gateway.decode_pool import THREAD_NAME_PREFIX, DecodePool


async def test_at_most_threads_run_at_once_and_the_rest_wait() -> None:
    pool = DecodePool(2)
    lock = threading.Lock()
    running = 0
    peak = 0
    names: set[str] = set()

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            names.add(threading.current_thread().name)
        time.sleep(0.05)
        with lock:
            running -= 1

    try:
        await asyncio.gather(*(pool.run(work) for _ in range(8)))
    finally:
        pool.close()
    assert peak == 2
    assert len(names) == 2 and all(n.startswith(THREAD_NAME_PREFIX) for n in names)


async def test_a_closed_pool_serves_again() -> None:
    pool = DecodePool(1)
    assert await pool.run(sum, [1, 2]) == 3
    pool.close()
    try:
        assert await pool.run(max, 4, 9) == 9
    finally:
        pool.close()
