"""TorchServe entry point for ``fcn`` (the archive's ``--handler``).

A direct image is answered with the friendly segmentation reply — its class mask as a palette
PNG with the pixels per class in the ``X-Pixel-Counts`` header, or the counts as JSON with
``X-Format: json`` — exactly as the gateway's ``/predict/fcn`` answers it;
:mod:`cnnserve.models.semantics` defines it. A packed batch from the gateway is answered with
the raw ``N×4×H×W`` scores.

The archive copies this file and TorchServe imports it as a top-level module, so it
imports cnnserve absolutely (the worker runs the Python that has cnnserve installed).
"""

from __future__ import annotations

from typing import Any

from cnnserve.handlers.service import HandlerContext, ModelHandler

_handler = ModelHandler("fcn")


def handle(data: list[dict[str, Any]] | None, context: HandlerContext) -> list[Any] | None:
    """TorchServe calls this with ``None`` once to load, then with each batch of requests."""
    return _handler.handle(data, context)
