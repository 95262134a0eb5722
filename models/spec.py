"""What the serving side knows about one model: its task, classes, input constraints and the
model-side steps for its images.

Specs are built from a model's config (:func:`cnnserve.models.repository.build_spec`); the two
demo models' are in :mod:`cnnserve.models.registry`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cnnserve.errors import InvalidInputError

from .imaging import DEFAULT_MAX_IMAGE_PIXELS, ImageHeader, decode_rgb, read_header
from .pixels import DEFAULT_NORMALIZATION, Normalization

if TYPE_CHECKING:
    from torch import nn

#: Largest FCN input side by default; bounds memory (one 512×512 image needs ~140 MB of
#: activations).
FCN_MAX_SIDE = 512
#: Smallest FCN input side: three valid 3×3 convolutions need at least 7 pixels.
FCN_MIN_SIDE = 7
#: Largest PNG a fixed-size model (the ConvNet) decodes, in pixels: a PNG is decoded whole
#: before it can be shrunk, so its cost (memory, ~15 ms of CPU at this size) grows with its
#: declared size, and a digit needs no poster. A JPEG is decoded at 1/8 of its size, so the
#: server's max_image_pixels is its only cap.
FIXED_SIZE_MAX_PNG_PIXELS = 1024 * 1024
#: A fixed-size model's images are shrunk while decoding until their longer side is at most
#: this: ~9× the ConvNet's 28 px, so cropping to the ink still keeps a digit's detail.
FIXED_SIZE_SHRINK_SIDE = 256


class Task(enum.Enum):
    """What a model's output means; everything that answers differently per model asks this."""

    #: One label per image: the network's output is ``N×C`` logits.
    CLASSIFICATION = "classification"
    #: One class per pixel: the network's output is ``N×C×H×W`` scores.
    SEGMENTATION = "segmentation"


class Architecture(enum.StrEnum):
    """The tutorial's two networks."""

    CONVNET = "convnet"
    FCN = "fcn"

    @property
    def task(self) -> Task:
        """What the network's output means."""
        return Task.CLASSIFICATION if self is Architecture.CONVNET else Task.SEGMENTATION

    def network(self, num_classes: int) -> nn.Module:
        """A fresh, untrained network of this architecture."""
        # torch only where a network is built (training, export, checkpoints): everything
        # else a spec serves runs from exported artifacts, without torch.
        from .networks import FCN, ConvNet

        return ConvNet(num_classes) if self is Architecture.CONVNET else FCN(num_classes)

    @property
    def head(self) -> str:
        """The parameter whose first dimension is the number of classes."""
        return "fc2.bias" if self is Architecture.CONVNET else "unsample3.bias"


@dataclass(frozen=True)
class ModelSpec:
    """Everything the serving side needs to know about one model."""

    name: str
    architecture: Architecture
    labels: tuple[str, ...]
    #: ``(H, W)`` when the network accepts one size only; ``None`` when any size in range.
    fixed_size: tuple[int, int] | None
    min_side: int
    max_side: int
    #: Decoded ``H×W×3`` RGB → ``3×H×W`` uint8 network pixels.
    rgb_to_pixels: Callable[[np.ndarray], np.ndarray]
    input_name: str
    output_name: str
    #: How pixels become network input, as the model was trained.
    normalization: Normalization = DEFAULT_NORMALIZATION
    #: The feature maps its exported artifacts offer as outputs (:mod:`.features`); none for
    #: a version exported without them.
    feature_layers: tuple[str, ...] = ()

    @property
    def task(self) -> Task:
        """What the model's output means."""
        return self.architecture.task

    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return len(self.labels)

    def network(self) -> nn.Module:
        """A fresh, untrained network of this model's architecture."""
        return self.architecture.network(self.num_classes)

    def shape_text(self) -> str:
        """The accepted input shape, for error messages: ``[N,3,28,28]`` or ``[N,3,H,W]``."""
        if self.fixed_size is not None:
            return f"[N,3,{self.fixed_size[0]},{self.fixed_size[1]}]"
        return f"[N,3,H,W] with {self.min_side} ≤ H, W ≤ {self.max_side}"

    def check_item_shape(self, shape: tuple[int, ...]) -> None:
        """Reject a ``3×H×W`` item shape this network cannot take, naming what it expects."""
        if len(shape) != 3 or shape[0] != 3:
            raise InvalidInputError(f"{self.name} expects {self.shape_text()}, got {list(shape)}")
        self.check_size(shape[1], shape[2])

    def check_size(self, height: int, width: int) -> None:
        """Reject an image size outside this model's range."""
        if self.fixed_size is not None:
            if (height, width) != self.fixed_size:
                raise InvalidInputError(
                    f"{self.name} expects {self.shape_text()}, got [N,3,{height},{width}]"
                )
            return
        if not (
            self.min_side <= height <= self.max_side and self.min_side <= width <= self.max_side
        ):
            raise InvalidInputError(
                f"{self.name} expects {self.shape_text()}, got [N,3,{height},{width}]"
            )

    def check_image_header(self, header: ImageHeader) -> None:
        """Refuse an image by its header, before it is decoded: outside the size range of a
        model that takes any size, or a PNG over a fixed-size model's
        :data:`FIXED_SIZE_MAX_PNG_PIXELS`."""
        if self.fixed_size is None:
            self.check_size(header.height, header.width)
        elif header.format == "PNG" and header.pixels > FIXED_SIZE_MAX_PNG_PIXELS:
            side = math.isqrt(FIXED_SIZE_MAX_PNG_PIXELS)
            raise InvalidInputError(
                f"{self.name} takes PNG images of at most {FIXED_SIZE_MAX_PNG_PIXELS} pixels "
                f"({side}×{side}); this one is {header.width}×{header.height}: send it "
                "smaller, or as JPEG"
            )

    def read_image_header(
        self, data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ) -> ImageHeader:
        """An encoded image's header, checked as :meth:`image_to_pixels` checks it (format,
        ``max_pixels``, :meth:`check_image_header`) — nothing is decoded."""
        header = read_header(data, max_pixels)
        self.check_image_header(header)
        return header

    def image_to_pixels(
        self,
        data: bytes,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        check_header: Callable[[ImageHeader], None] | None = None,
    ) -> np.ndarray:
        """Encoded PNG/JPEG bytes → ``3×H×W`` uint8 pixels ready for :func:`normalize`.

        ``check_header`` (default :meth:`check_image_header`) may refuse the header before any
        pixel is decoded; one given must do that check too."""
        # Any size is shrunk towards a fixed-size network's input while it is decoded; the
        # size of the others is checked from the image's header, before any pixel is decoded.
        shrink_to_side = FIXED_SIZE_SHRINK_SIDE if self.fixed_size is not None else None
        check = check_header or self.check_image_header
        rgb = decode_rgb(data, max_pixels, check, shrink_to_side)
        return self.rgb_to_pixels(rgb)
