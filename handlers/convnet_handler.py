"""TorchServe entry point for ``convnet`` (the archive's ``--handler``).

A direct image is answered with the friendly classification reply — JSON, the ``k`` most
probable digits, best first (``X-Top-K`` header, default 3) — exactly as the gateway's
``/predict/convnet`` answers it; :mod:`cnnserve.models.semantics` defines it. A packed batch
from the gateway is answered with the raw ``N×10`` logits.

The archive copies this file and TorchServe imports it as a top-level module, so it
imports cnnserve absolutely (the worker runs the Python that has cnnserve installed).
"""

from __future__ import annotations

from typing import Any

from cnnserve.handlers.service import HandlerContext, ModelHandler

_handler = ModelHandler("convnet")


def handle(data: list[dict[str, Any]] | None, context: HandlerContext) -> list[Any] | None:
    """TorchServe calls this with ``None`` once to load, then with each batch of requests."""
    return _handler.handle(data, context)
