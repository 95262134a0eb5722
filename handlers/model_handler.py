"""TorchServe's entry point for every cnnserve model (each archive's ``--handler``).

The model is the one the archive holds: the name TorchServe registered it under, the version's
``config.yaml`` and ``export.json`` (see :func:`cnnserve.handlers.service.archived_spec`). A
direct image is answered with the friendly reply of :mod:`cnnserve.models.semantics` — JSON
top-k for a classifier (``X-Top-K`` header, default 3), a palette mask PNG with
``X-Pixel-Counts`` (or counts as JSON with ``X-Format: json``) for a segmenter — exactly as the
gateway's ``/predict/{model}`` answers it. A packed batch from the gateway is answered with the
network's raw output (``N×C`` logits or ``N×C×H×W`` scores); a packed batch of encoded images
is decoded here, in the worker process, and answered with the raw output and each image that
failed (:mod:`cnnserve.handlers.packing`).

The archive copies this file and TorchServe imports it as a top-level module, so it imports
cnnserve absolutely (the worker runs the Python that has cnnserve installed). A worker process
serves one model version, so the module holds one handler.
"""

from __future__ import annotations

from typing import Any

from cnnserve.handlers.service import HandlerContext, ModelHandler

_handler = ModelHandler()


def handle(data: list[dict[str, Any]] | None, context: HandlerContext) -> list[Any] | None:
    """TorchServe calls this with ``None`` once to load, then with each batch of requests."""
    return _handler.handle(data, context)
