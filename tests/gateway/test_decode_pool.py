"""The decode pool runs at most its thread count at once, and serves again after close; the
decode processes decode a batch of images as the model's steps do, keep each failure to its
item, and survive a killed process."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cnnserve.errors import UnavailableError
from cnnserve.gateway.decode_pool import THREAD_NAME_PREFIX, DecodePool, ImageDecoder
from cnnserve.gateway.decode_worker import ImageJob
from cnnserve.models.imaging import DEFAULT_MAX_IMAGE_PIXELS
from cnnserve.models.pixels import normalize
from cnnserve.models.registry import get_spec
from tests.images import digit_png, shapes_png
from tests.support import wait_until_async


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


# --- decode processes: a batch of encoded images decoded beside the event loop ---

CONVNET = get_spec("convnet")
FCN = get_spec("fcn")


def digit_job(*images: bytes, normalize: bool = True) -> ImageJob:
    """A ConvNet batch of ``images`` at the default pixel cap."""
    return ImageJob(CONVNET, list(images), DEFAULT_MAX_IMAGE_PIXELS, normalize)


def garbled(png: bytes) -> bytes:
    """``png`` with a valid header and its image data overwritten: only a decode finds out."""
    middle = len(png) // 2
    return png[:middle] + bytes(len(png) - middle)


def process_state(pid: int) -> str:
    """The kernel's one-letter state of a process (``Z``: exited, not reaped yet)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def process_names(pid: int) -> str:
    """What a process has mapped (its loaded libraries and modules)."""
    return Path(f"/proc/{pid}/maps").read_text()


async def test_processes_decode_a_batch_like_the_model_steps() -> None:
    digits = [digit_png(i)[0] for i in range(9)]
    decoder = ImageDecoder(2, DecodePool(1))
    try:
        rows, failures = await decoder.prepare(digit_job(*digits))
        pixels, _ = await decoder.prepare(digit_job(*digits[:2], normalize=False))
        pids = decoder.pids()
        mapped = [process_names(pid) for pid in pids]
    finally:
        decoder.close()
    expected = np.stack([CONVNET.image_to_pixels(d) for d in digits])
    assert failures == {}
    np.testing.assert_array_equal(rows, normalize(expected, CONVNET.normalization))
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, expected[:2])
    # Nine images were shared between both processes; neither loaded a model runtime.
    assert len(pids) == 2
    assert all("PIL" in names for names in mapped)
    assert not any("torch" in names or "onnxruntime" in names for names in mapped)
    assert decoder.pids() == []


@pytest.mark.parametrize("processes", [0, 2])
async def test_a_garbled_image_fails_alone_with_its_index(processes: int) -> None:
    digits = [digit_png(i)[0] for i in range(9)]
    digits[6] = garbled(digits[6])
    digits[1] = garbled(digits[1])
    decoder = ImageDecoder(processes, DecodePool(2))
    try:
        rows, failures = await decoder.prepare(digit_job(*digits))
    finally:
        decoder.close()
    assert sorted(failures) == [1, 6]
    assert all("could not decode image" in str(exc) for exc in failures.values())
    assert len(rows) == 9
    np.testing.assert_array_equal(
        rows[0], normalize(CONVNET.image_to_pixels(digits[0]), CONVNET.normalization)
    )


async def test_an_fcn_image_not_of_its_batch_size_is_refused_before_decoding() -> None:
    scene, _ = shapes_png(side=32)
    other, _ = shapes_png(side=40)
    decoder = ImageDecoder(1, DecodePool(1))
    try:
        job = ImageJob(FCN, [scene, other, scene], DEFAULT_MAX_IMAGE_PIXELS, True)
        rows, failures = await decoder.prepare(job)
    finally:
        decoder.close()
    assert rows.shape == (3, 3, 32, 32)
    assert list(failures) == [1]
    assert "its batch was formed for 32×32 images" in str(failures[1])


async def test_a_killed_process_fails_only_its_batch_and_is_replaced() -> None:
    decoder = ImageDecoder(1, DecodePool(1))
    digit = digit_png(0)[0]
    try:
        await decoder.prepare(digit_job(digit))
        [pid] = decoder.pids()
        # Stopped, it holds the next batch without answering; killed, it never will.
        os.kill(pid, signal.SIGSTOP)
        held = asyncio.create_task(decoder.prepare(digit_job(digit, digit)))
        await wait_until_async(lambda: decoder.holding() == [pid], 30, "the batch held")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(UnavailableError, match="died"):
            await held
        rows, failures = await decoder.prepare(digit_job(digit, digit, digit))
        assert len(rows) == 3 and failures == {}
        assert decoder.pids() != [pid] and len(decoder.pids()) == 1
    finally:
        decoder.close()


async def test_a_process_that_died_idle_is_replaced_without_failing_anything() -> None:
    decoder = ImageDecoder(1, DecodePool(1))
    digit = digit_png(0)[0]
    try:
        await decoder.prepare(digit_job(digit))
        [pid] = decoder.pids()
        os.kill(pid, signal.SIGKILL)
        # Dead and not reaped yet (a zombie): what the next batch finds.
        await wait_until_async(lambda: process_state(pid) == "Z", 30, "the process dead")
        rows, failures = await decoder.prepare(digit_job(digit, digit))
        assert len(rows) == 2 and failures == {}
    finally:
        decoder.close()


async def test_closing_ends_the_processes_and_a_later_batch_starts_them_again() -> None:
    decoder = ImageDecoder(2, DecodePool(1))
    digit = digit_png(0)[0]
    try:
        await decoder.prepare(digit_job(*[digit] * 8))
        first = decoder.pids()
        decoder.close()
        assert decoder.pids() == []
        for pid in first:
            assert not Path(f"/proc/{pid}").exists()
        rows, _ = await decoder.prepare(digit_job(digit))
        assert len(rows) == 1
    finally:
        decoder.close()
