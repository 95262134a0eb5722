"""TorchServe entry point for ``fcn`` (the archive's ``--handler``).

A direct image is answered with its class mask as a grayscale PNG of the image's size (pixel
value = class index, 0 = background) and the pixels per class, as JSON, in the
``X-Pixel-Counts`` header. Ask for JSON instead with ``Accept: application/json``::

    {"model": "fcn", "height": 64, "width": 64, "labels": [...],
     "pixel_counts": {"background": 3000, ...}, "mask": [[0, 0, 1, ...], ...]}

A packed batch from the gateway is answered with the raw ``N×4×H×W`` scores.

The archive copies this file and TorchServe imports it as a top-level module, so it
imports cnnserve absolutely (the worker runs the Python that has cnnserve installed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from cnnserve.handlers.service import JSON_CONTENT_TYPE, HandlerContext, ModelHandler, Reply
from cnnserve.models.imaging import encode_png
from cnnserve.models.registry import ModelSpec
from cnnserve.models.steps import class_mask, pixel_counts

PIXEL_COUNTS_HEADER = "X-Pixel-Counts"


def wants_json(options: Mapping[str, str]) -> bool:
    """Whether the caller asked for the JSON form (``Accept: application/json``)."""
    return JSON_CONTENT_TYPE in options.get("accept", "")


def render_segmentation(spec: ModelSpec, scores: np.ndarray, options: Mapping[str, str]) -> Reply:
    """One image's ``C×H×W`` scores → the mask (PNG or JSON) and per-class pixel counts."""
    (mask,) = class_mask(scores[np.newaxis])
    counts = dict(zip(spec.labels, pixel_counts(mask, spec.num_classes), strict=True))
    if wants_json(options):
        body = {
            "model": spec.name,
            "height": int(mask.shape[0]),
            "width": int(mask.shape[1]),
            "labels": list(spec.labels),
            "pixel_counts": counts,
            "mask": mask.tolist(),
        }
        return Reply(json.dumps(body).encode(), JSON_CONTENT_TYPE)
    return Reply(encode_png(mask), "image/png", {PIXEL_COUNTS_HEADER: json.dumps(counts)})


_handler = ModelHandler("fcn", render_segmentation)


def handle(data: list[dict[str, Any]] | None, context: HandlerContext) -> list[Any] | None:
    """TorchServe calls this with ``None`` once to load, then with each batch of requests."""
    return _handler.handle(data, context)
