"""A batch of encoded images decoded where it runs, each failure kept to its own item.

The gateway reads every image's header (format, pixel cap, size) before an image joins a
batch; the batch then travels encoded to wherever decoding runs in parallel with the
gateway's event loop — a TorchServe worker process, or a decode process of an in-process
backend — and is decoded there by :func:`decode_image_batch`. The limits are applied again
where the pixels are decoded: the image's own header must declare the size the gateway
priced, and ``max_pixels`` bounds the decode, so a batch can never cost more than the
gateway reserved for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cnnserve.errors import InvalidInputError

from .imaging import ImageHeader
from .spec import ModelSpec


@dataclass(frozen=True)
class DecodedImages:
    """uint8 ``N×3×H×W`` pixels for every item; a failed item's rows are zeros and its error
    is in ``failures`` under its index in the batch."""

    pixels: np.ndarray
    failures: dict[int, InvalidInputError] = field(default_factory=dict)


def decode_image_batch(
    spec: ModelSpec,
    images: Sequence[bytes],
    max_pixels: int,
    declared_size: tuple[int, int] | None = None,
) -> DecodedImages:
    """Decode each of ``images`` with ``spec``'s own steps (:meth:`ModelSpec.image_to_pixels`).

    ``declared_size`` — ``(width, height)`` every image's header declared when the batch was
    formed (a size-variable model's batch shares one size) — is checked against each image's
    header before its pixels are decoded; ``None`` for a fixed-size model, whose images may
    differ in size (each is shrunk to the network's input).
    """
    if not images:
        raise InvalidInputError("an image batch needs at least one image")

    def check(header: ImageHeader) -> None:
        spec.check_image_header(header)
        if declared_size is not None and header.size != declared_size:
            raise InvalidInputError(
                f"image is {header.width}×{header.height}, but its batch was formed for "
                f"{declared_size[0]}×{declared_size[1]} images"
            )

    decoded: list[np.ndarray | None] = []
    failures: dict[int, InvalidInputError] = {}
    for index, data in enumerate(images):
        try:
            decoded.append(spec.image_to_pixels(data, max_pixels, check))
        except InvalidInputError as exc:
            failures[index] = exc
            decoded.append(None)
    shapes = {item.shape for item in decoded if item is not None}
    if len(shapes) > 1:
        # Only a size-variable model called without declared_size can get here.
        raise InvalidInputError(f"images of one batch decode to different shapes: {sorted(shapes)}")
    if not shapes:
        item_shape = (3, *(spec.fixed_size or (declared_size or (1, 1))[::-1]))
    else:
        item_shape = shapes.pop()
    pixels = np.zeros((len(images), *item_shape), dtype=np.uint8)
    for index, item in enumerate(decoded):
        if item is not None:
            pixels[index] = item
    return DecodedImages(pixels, failures)
