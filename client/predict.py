"""``cnnserve predict``: classify digits or segment scenes through a running gateway."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from cnnserve.models.imaging import encode_mask_png

from .inference import InferenceClient


def classify_files(client: InferenceClient, paths: Sequence[Path], model: str) -> Iterator[str]:
    """One line per image: ``path: label (probability)``; all images go in one request."""
    results = client.classify([p.read_bytes() for p in paths], model=model)
    for path, result in zip(paths, results, strict=True):
        yield f"{path}: {result.label} ({result.probability:.3f})"


def mask_path(image: Path, out_dir: Path | None) -> Path:
    """Where an image's mask goes: ``<stem>.mask.png`` beside it, or in ``out_dir``."""
    return (out_dir or image.parent) / f"{image.stem}.mask.png"


def segment_files(
    client: InferenceClient, paths: Sequence[Path], model: str, out_dir: Path | None
) -> Iterator[str]:
    """Write each image's class mask as a palette PNG; one line per image.

    One request per image: scenes of different sizes cannot share a request.
    """
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    for path in paths:
        mask = client.segment(path.read_bytes(), model=model)
        target = mask_path(path, out_dir)
        target.write_bytes(encode_mask_png(mask))
        yield f"{path}: mask {mask.shape[1]}×{mask.shape[0]} → {target}"
