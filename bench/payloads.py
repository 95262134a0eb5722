"""What the benchmark sends: float32 tensors, PNG digits over OIP, PNG digits over REST.

Every scenario sends one request over and over, built once here: random float32 items for
the ``input`` tensor (the gateway's fastest form), or held-out digits rendered as PNG for the
``image`` input and for TorchServe's REST API — the same bytes both ways, so the gateway and
TorchServe alone decode the same images.
"""

from __future__ import annotations

import numpy as np

from cnnserve.models.imaging import encode_png
from cnnserve.training.datasets import digits_split, render_digit

from .loadgen import http_request, infer_request


def digit_pngs(count: int) -> list[bytes]:
    """``count`` held-out digits as 64×64 PNGs (repeating the split when more are asked)."""
    split = digits_split(0)
    glyphs = split.test_images
    return [encode_png(render_digit(glyphs[i % len(glyphs)], None)) for i in range(count)]


def tensor_items(items: int, side: int) -> np.ndarray:
    """``items`` random normalized images, float32 ``items×3×side×side``."""
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, size=(items, 3, side, side)).astype(np.float32)


def oip_request(model: str, side: int, items: int, payload: str) -> bytes:
    """The serialized ModelInferRequest a scenario sends: ``payload`` ``tensor`` (FP32
    ``input``) or ``png`` (BYTES ``image``, ConvNet only)."""
    if payload == "png":
        pngs = np.empty(items, dtype=object)
        pngs[:] = digit_pngs(items)
        return infer_request(model, pngs, input_name="image")
    return infer_request(model, tensor_items(items, side))


def rest_request(target: str, model: str, inference_key: str | None) -> bytes:
    """A PNG digit POSTed to TorchServe's ``/predictions/<model>``, with its inference key."""
    headers = {"Content-Type": "image/png"}
    if inference_key:
        headers["Authorization"] = f"Bearer {inference_key}"
    return http_request(target, f"/predictions/{model}", digit_pngs(1)[0], headers)
