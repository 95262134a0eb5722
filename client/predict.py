"""``cnnserve predict``: classify digits or segment scenes through a running gateway.

Each function yields one result per image, as a dict (what ``--json`` prints) and a line
(what the command prints otherwise). Many images go as several requests, each within what
the gateway takes: the model's ``max_batch_size`` (read from its configuration through the
protocol) and a byte limit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve.models.imaging import encode_mask_png

from .inference import InferenceClient

#: Bytes of images one request carries at most: the gateway's default message limit
#: (settings.max_message_bytes, 20 MiB) less room for the request's own framing. The gateway
#: does not advertise its limit, so one raised there still gets requests of this size.
REQUEST_IMAGE_BYTES = 20 * 1024 * 1024 - 64 * 1024

#: Images one request carries at most whatever the model's batch size: the gateway's default
#: settings.max_items_per_request.
REQUEST_ITEMS = 256

Result = tuple[dict[str, Any], str]


def split(images: Sequence[bytes], max_items: int, max_bytes: int) -> Iterator[range]:
    """Consecutive index ranges of ``images``, each at most ``max_items`` images and
    ``max_bytes`` bytes; an image over ``max_bytes`` alone goes alone (the gateway says why
    it refuses it)."""
    start, size = 0, 0
    for index, image in enumerate(images):
        if index > start and (index - start == max_items or size + len(image) > max_bytes):
            yield range(start, index)
            start, size = index, 0
        size += len(image)
    if start < len(images):
        yield range(start, len(images))


def classify_files(
    client: InferenceClient,
    paths: Sequence[Path],
    model: str,
    top_k: int = 1,
    timeout_s: float | None = None,
) -> Iterator[Result]:
    """Per image: ``path: label (probability)`` (with ``top_k`` > 1, the ``top_k`` best,
    comma-separated) and its JSON form; as few requests as the gateway's limits allow."""
    images = [p.read_bytes() for p in paths]
    batch = min(max(client.max_batch_size(model), 1), REQUEST_ITEMS)
    for part in split(images, batch, REQUEST_IMAGE_BYTES):
        chosen = [images[i] for i in part]
        ranked = client.classify_top(chosen, top_k, model=model, timeout_s=timeout_s)
        for index, best in zip(part, ranked, strict=True):
            path = paths[index]
            shown = ", ".join(f"{c.label} ({c.probability:.3f})" for c in best)
            labels = [{"label": c.label, "probability": c.probability} for c in best]
            yield {"image": str(path), **labels[0], "top_k": labels}, f"{path}: {shown}"


def mask_path(image: Path, out_dir: Path | None) -> Path:
    """Where an image's mask goes: ``<stem>.mask.png`` beside it, or in ``out_dir``."""
    return (out_dir or image.parent) / f"{image.stem}.mask.png"


def segment_files(
    client: InferenceClient,
    paths: Sequence[Path],
    model: str,
    out_dir: Path | None,
    timeout_s: float | None = None,
) -> Iterator[Result]:
    """Write each image's class mask as a palette PNG; per image a line and its JSON form
    (the mask's path, size and pixels per class).

    One request per image: scenes of different sizes cannot share a request.
    """
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    for path in paths:
        mask = client.segment(path.read_bytes(), model=model, timeout_s=timeout_s)
        target = mask_path(path, out_dir)
        target.write_bytes(encode_mask_png(mask))
        classes, counts = np.unique(mask, return_counts=True)
        result = {
            "image": str(path),
            "mask": str(target),
            "width": int(mask.shape[1]),
            "height": int(mask.shape[0]),
            "pixels_per_class": {str(c): int(n) for c, n in zip(classes, counts, strict=True)},
        }
        yield result, f"{path}: mask {mask.shape[1]}×{mask.shape[0]} → {target}"
