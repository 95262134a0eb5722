"""TorchServe entry point for ``convnet`` (the archive's ``--handler``).

A direct image is answered with JSON, the ``k`` most probable digits, best first::

    {"model": "convnet", "predictions": [{"label": "7", "index": 7, "probability": 0.98}, ...]}

``k`` is 3 unless the ``X-Top-K`` request header says otherwise (``-H "X-Top-K: 5"``; TorchServe
does not pass query parameters on to handlers).
A packed batch from the gateway is answered with the raw ``N×10`` logits.

The archive copies this file and TorchServe imports it as a top-level module, so it
imports cnnserve absolutely (the worker runs the Python that has cnnserve installed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from cnnserve.errors import InvalidInputError
from cnnserve.handlers.service import JSON_CONTENT_TYPE, HandlerContext, ModelHandler, Reply
from cnnserve.models.registry import ModelSpec
from cnnserve.models.steps import top_k

DEFAULT_TOP_K = 3
#: The option (request header, lower-cased) that sets k.
TOP_K_OPTION = "x-top-k"


def render_classification(spec: ModelSpec, logits: np.ndarray, options: Mapping[str, str]) -> Reply:
    """One image's logits → the JSON top-k reply."""
    raw_k = options.get(TOP_K_OPTION, str(DEFAULT_TOP_K))
    try:
        k = int(raw_k)
    except ValueError:
        raise InvalidInputError(f"X-Top-K must be an integer, got {raw_k!r}") from None
    (result,) = top_k(logits[np.newaxis], spec.labels, k)
    predictions = [
        {"label": label, "index": index, "probability": probability}
        for label, index, probability in zip(
            result.labels, result.indices, result.probabilities, strict=True
        )
    ]
    body = {"model": spec.name, "predictions": predictions}
    return Reply(json.dumps(body).encode(), JSON_CONTENT_TYPE)


_handler = ModelHandler("convnet", render_classification)


def handle(data: list[dict[str, Any]] | None, context: HandlerContext) -> list[Any] | None:
    """TorchServe calls this with ``None`` once to load, then with each batch of requests."""
    return _handler.handle(data, context)
