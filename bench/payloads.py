"""What the benchmark sends: float32 tensors or PNG digits, over OIP gRPC, OIP REST (the binary
tensor extension), the friendly ``/predict`` route, or TorchServe's own REST API.

Every scenario sends one request over and over, built once here: random float32 items for
the ``input`` tensor (the gateway's fastest form), or held-out digits rendered as PNG for the
``image`` input, for ``/predict`` and for TorchServe's REST API — the same bytes every way, so
the gateway and TorchServe alone decode the same images.
"""

from __future__ import annotations

import numpy as np

from cnnserve.models.imaging import encode_png
from cnnserve.protocol.domain import InferRequest, Tensor
from cnnserve.protocol.http_codec import HEADER_LENGTH, encode_infer_request
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


def _items(side: int, items: int, payload: str) -> tuple[str, np.ndarray]:
    """The input name and data a scenario's ``payload`` sends: ``tensor`` (FP32 ``input``) or
    ``png`` (BYTES ``image``, ConvNet only)."""
    if payload == "png":
        pngs = np.empty(items, dtype=object)
        pngs[:] = digit_pngs(items)
        return "image", pngs
    return "input", tensor_items(items, side)


def oip_request(model: str, side: int, items: int, payload: str) -> bytes:
    """The serialized ModelInferRequest a gRPC scenario sends (see :func:`_items`)."""
    name, data = _items(side, items, payload)
    return infer_request(model, data, input_name=name)


def oip_rest_request(target: str, model: str, side: int, items: int, payload: str) -> bytes:
    """The same request as :func:`oip_request` over OIP REST with the binary tensor extension:
    a JSON header (its length in ``Inference-Header-Content-Length``) then the raw tensor, and
    the outputs asked for in binary too, so neither side writes or parses numbers as JSON."""
    name, data = _items(side, items, payload)
    body, header_length = encode_infer_request(
        InferRequest(model, [Tensor(name, _DATATYPE[data.dtype], data.shape, data)])
    )
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}
    return http_request(target, f"/v2/models/{model}/infer", body, headers)


_DATATYPE = {np.dtype(np.float32): "FP32", np.dtype(object): "BYTES"}


def _png_post(target: str, path: str, inference_key: str | None = None) -> bytes:
    """One PNG digit (the first of :func:`digit_pngs`) POSTed as the body to ``path``."""
    headers = {"Content-Type": "image/png"}
    if inference_key:
        headers["Authorization"] = f"Bearer {inference_key}"
    return http_request(target, path, digit_pngs(1)[0], headers)


def predict_request(target: str, model: str) -> bytes:
    """A PNG digit POSTed to the gateway's friendly ``/predict/<model>`` (JSON top-k back)."""
    return _png_post(target, f"/predict/{model}")


def rest_request(target: str, model: str, inference_key: str | None) -> bytes:
    """A PNG digit POSTed to TorchServe's ``/predictions/<model>``, with its inference key."""
    return _png_post(target, f"/predictions/{model}", inference_key)
