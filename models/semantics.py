"""What a model's output means to its caller, decided once for every way of serving it.

Everything that answers differently per model goes through the spec's :class:`Task` and the
functions here: the ranking every top-k uses, pixel counts, the readiness probe's input, and
the **friendly reply** — what a person gets back for images. TorchServe's direct
``POST /predictions/{model}`` and the gateway's ``POST /predict/{model}`` both answer with
:func:`render_reply`, so the same image gets the same bytes from either.

The friendly reply, by task:

- classification — ``application/json``, one prediction per image, its ``top_k`` the ``k``
  most probable classes, best first (equal probabilities: lower index first)::

      {"model": "convnet", "predictions": [{"label": "7", "top_k": [
          {"label": "7", "index": 7, "probability": 0.9975}, ...]}]}

  Probabilities are rounded to :data:`PROBABILITY_DECIMALS` places.
- segmentation, ``format`` ``png`` (the default) — the class mask of one image as a palette
  PNG of the image's size (pixel value = class index, each class in its own colour), and its
  pixels per class as JSON in the :data:`PIXEL_COUNTS_HEADER` header;
- segmentation, ``format`` ``json`` — one entry per image::

      {"model": "fcn", "predictions": [{"counts": {"background": 3000, "solid": 412, ...}}]}

Options (:func:`parse_options`): ``top_k`` (default :data:`DEFAULT_TOP_K`) and ``format``,
query parameters at the gateway, headers ``X-Top-K`` / ``X-Format`` (or extra inputs named
like the option) at TorchServe, which does not pass query parameters on to handlers.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnserve.errors import InvalidInputError

from .imaging import encode_mask_png
from .spec import ModelSpec, Task
from .steps import class_mask, softmax

JSON_CONTENT_TYPE = "application/json"
PNG_CONTENT_TYPE = "image/png"
#: Header of a mask PNG reply carrying its pixels per class, ``{"background": 3000, ...}``.
PIXEL_COUNTS_HEADER = "X-Pixel-Counts"
#: Classes a friendly classification lists per image unless the caller asks otherwise.
DEFAULT_TOP_K = 3
#: Decimal places of a friendly probability: enough for a person, and few enough that two
#: servers running the same model print the same digits.
PROBABILITY_DECIMALS = 4


def ranked(values: np.ndarray, k: int) -> np.ndarray:
    """``N×C`` values → ``N×min(k, C)`` class indices, largest value first.

    The sort is stable, so equal values keep class order; every ranked output (the OIP
    ``labels``, Triton's classification strings, the friendly top-k) uses this one order.
    """
    order: np.ndarray = np.argsort(-values, axis=-1, kind="stable")[:, :k]
    return order


@dataclass(frozen=True)
class Classification:
    """One image's top-k classes, best first."""

    labels: tuple[str, ...]
    indices: tuple[int, ...]
    probabilities: tuple[float, ...]


def top_k(logits: np.ndarray, labels: tuple[str, ...], k: int) -> list[Classification]:
    """``N×C`` logits → N classifications of the ``k`` most probable classes."""
    probabilities = softmax(logits)
    return [
        Classification(
            labels=tuple(labels[i] for i in row),
            indices=tuple(int(i) for i in row),
            probabilities=tuple(float(probabilities[n, i]) for i in row),
        )
        for n, row in enumerate(ranked(probabilities, k))
    ]


def pixel_counts(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """``N×H×W`` class masks → ``N×C`` int64 pixels per class."""
    # One bincount for the whole batch: item n's classes are shifted to n·C … n·C + C - 1.
    offsets = (np.arange(len(masks), dtype=np.int64) * num_classes)[:, None, None]
    counts = np.bincount((masks + offsets).ravel(), minlength=len(masks) * num_classes)
    return counts.reshape(len(masks), num_classes).astype(np.int64)


def probe_input(spec: ModelSpec) -> np.ndarray:
    """What a readiness probe runs: one all-zero normalized image of the smallest size the
    network accepts, so the check proves the model answers at the least cost."""
    height, width = spec.fixed_size or (spec.min_side, spec.min_side)
    return np.zeros((1, 3, height, width), dtype=np.float32)


class MaskFormat(enum.Enum):
    """How a friendly segmentation reply carries its result."""

    #: One image's class mask as a palette PNG.
    PNG = "png"
    #: Pixels per class of every image, as JSON.
    JSON = "json"


@dataclass(frozen=True)
class Option:
    """One option of a friendly reply and the names it travels under."""

    #: Query parameter at the gateway, extra input name at TorchServe.
    name: str
    #: Request header at TorchServe (which drops query parameters).
    header: str
    description: str


TOP_K_OPTION = Option("top_k", "X-Top-K", "Classification: classes listed per image, best first.")
FORMAT_OPTION = Option(
    "format",
    "X-Format",
    "Segmentation: png, the mask of one image as a palette PNG; json, the pixels per class of "
    "every image.",
)


@dataclass(frozen=True)
class ReplyOptions:
    """A caller's choices for a friendly reply; each applies to one task, the other's ignored."""

    top_k: int = DEFAULT_TOP_K
    format: MaskFormat = MaskFormat.PNG


def parse_options(values: Mapping[str, str]) -> ReplyOptions:
    """The options found in ``values`` (keys lower-cased), defaults for the others.

    Each option is looked up under its name, then its header; a bad value is an
    :class:`InvalidInputError` that names the option as the caller sent it.
    """
    options = ReplyOptions()
    found = _lookup(values, TOP_K_OPTION)
    if found is not None:
        sent_as, text = found
        # int() refuses more than 4,300 digits; 18 are past any number of classes.
        if not (text.isascii() and text.isdigit() and len(text) <= 18 and int(text) >= 1):
            raise InvalidInputError(f"{sent_as} must be an integer ≥ 1, got {text[:40]!r}")
        options = ReplyOptions(int(text), options.format)
    found = _lookup(values, FORMAT_OPTION)
    if found is not None:
        sent_as, text = found
        try:
            options = ReplyOptions(options.top_k, MaskFormat(text))
        except ValueError:
            accepted = " or ".join(f.value for f in MaskFormat)
            raise InvalidInputError(f"{sent_as} must be {accepted}, got {text!r}") from None
    return options


def _lookup(values: Mapping[str, str], option: Option) -> tuple[str, str] | None:
    """``(name as sent, value)`` of ``option`` in ``values``, or None when absent."""
    for sent_as in (option.name, option.header):
        value = values.get(sent_as.lower())
        if value is not None:
            return sent_as, value.strip()
    return None


@dataclass(frozen=True)
class Reply:
    """A friendly reply: body, media type and extra headers."""

    body: bytes
    content_type: str
    headers: Mapping[str, str] = field(default_factory=dict)


def check_image_count(spec: ModelSpec, options: ReplyOptions, count: int) -> None:
    """Refuse ``count`` images the reply cannot carry: a mask PNG holds one image."""
    if spec.task is Task.SEGMENTATION and options.format is MaskFormat.PNG and count != 1:
        raise InvalidInputError(
            f"a PNG answer holds one mask; got {count} images (send one, or ask for "
            f"{FORMAT_OPTION.name} {MaskFormat.JSON.value})"
        )


def render_reply(spec: ModelSpec, raw: np.ndarray, options: ReplyOptions) -> Reply:
    """The network's raw output for a request's images (``N×…``) → the friendly reply."""
    check_image_count(spec, options, len(raw))
    if spec.task is Task.CLASSIFICATION:
        return _classification_reply(spec, raw, options.top_k)
    return _segmentation_reply(spec, class_mask(raw), options.format)


def _classification_reply(spec: ModelSpec, logits: np.ndarray, k: int) -> Reply:
    predictions = [
        {
            "label": result.labels[0],
            "top_k": [
                {"label": label, "index": index, "probability": round(p, PROBABILITY_DECIMALS)}
                for label, index, p in zip(
                    result.labels, result.indices, result.probabilities, strict=True
                )
            ],
        }
        for result in top_k(logits, spec.labels, k)
    ]
    return Reply(_json({"model": spec.name, "predictions": predictions}), JSON_CONTENT_TYPE)


def _segmentation_reply(spec: ModelSpec, masks: np.ndarray, mask_format: MaskFormat) -> Reply:
    counts = [
        dict(zip(spec.labels, map(int, row), strict=True))
        for row in pixel_counts(masks, spec.num_classes)
    ]
    if mask_format is MaskFormat.JSON:
        predictions = [{"counts": c} for c in counts]
        return Reply(_json({"model": spec.name, "predictions": predictions}), JSON_CONTENT_TYPE)
    (mask,), (mask_counts,) = masks, counts
    # ASCII-escaped: a header value cannot carry arbitrary UTF-8.
    headers = {PIXEL_COUNTS_HEADER: json.dumps(mask_counts, separators=(",", ":"))}
    return Reply(encode_mask_png(mask), PNG_CONTENT_TYPE, headers)


def _json(document: Any) -> bytes:
    """Compact UTF-8 JSON: every server writes the same bytes for the same document."""
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
