"""The two served models: names, input constraints, labels and their model-side steps.

A literal dict on purpose: two models need no plugin machinery.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from cnnserve.errors import InvalidInputError, UnknownModelError

from .imaging import DEFAULT_MAX_IMAGE_PIXELS, decode_rgb
from .networks import FCN, ConvNet
from .steps import CONVNET_SIDE, digit_pixels, to_chw

#: Largest FCN input side; bounds memory (one 512×512 image needs ~140 MB of activations).
FCN_MAX_SIDE = 512
#: Smallest FCN input side: three valid 3×3 convolutions need at least 7 pixels.
FCN_MIN_SIDE = 7

WEIGHTS_DIR = Path(__file__).parent / "weights"


class Task(enum.Enum):
    """What a model's output means; everything that answers differently per model asks this."""

    #: One label per image: the network's output is ``N×C`` logits.
    CLASSIFICATION = "classification"
    #: One class per pixel: the network's output is ``N×C×H×W`` scores.
    SEGMENTATION = "segmentation"


@dataclass(frozen=True)
class ModelSpec:
    """Everything the serving side needs to know about one model."""

    name: str
    task: Task
    labels: tuple[str, ...]
    build: Callable[[int], nn.Module]
    #: ``(H, W)`` when the network accepts one size only; ``None`` when any size in range.
    fixed_size: tuple[int, int] | None
    min_side: int
    max_side: int
    #: Decoded ``H×W×3`` RGB → ``3×H×W`` uint8 network pixels.
    rgb_to_pixels: Callable[[np.ndarray], np.ndarray]
    input_name: str
    output_name: str

    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return len(self.labels)

    @property
    def weights_path(self) -> Path:
        """The committed demo checkpoint."""
        return WEIGHTS_DIR / f"{self.name}.pt"

    def network(self) -> nn.Module:
        """A fresh, untrained network of this model's architecture."""
        return self.build(self.num_classes)

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

    def image_to_pixels(
        self, data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ) -> np.ndarray:
        """Encoded PNG/JPEG bytes → ``3×H×W`` uint8 pixels ready for :func:`normalize`."""
        # Any size is resized to a fixed-size network's input; others are checked from the
        # image's header, before its pixels are decoded.
        rgb = decode_rgb(data, max_pixels, None if self.fixed_size else self.check_size)
        return self.rgb_to_pixels(rgb)


def _fcn_pixels(rgb: np.ndarray) -> np.ndarray:
    # Segmentation masks must line up with the input, so FCN images are never resized.
    return to_chw(rgb)


SHAPE_CLASSES = ("background", "solid", "outline", "striped")

MODELS: dict[str, ModelSpec] = {
    "convnet": ModelSpec(
        name="convnet",
        task=Task.CLASSIFICATION,
        labels=tuple(str(d) for d in range(10)),
        build=ConvNet,
        fixed_size=(CONVNET_SIDE, CONVNET_SIDE),
        min_side=CONVNET_SIDE,
        max_side=CONVNET_SIDE,
        rgb_to_pixels=digit_pixels,
        input_name="input",
        output_name="logits",
    ),
    "fcn": ModelSpec(
        name="fcn",
        task=Task.SEGMENTATION,
        labels=SHAPE_CLASSES,
        build=FCN,
        fixed_size=None,
        min_side=FCN_MIN_SIDE,
        max_side=FCN_MAX_SIDE,
        rgb_to_pixels=_fcn_pixels,
        input_name="input",
        output_name="scores",
    ),
}


def get_spec(name: str) -> ModelSpec:
    """The spec of a served model, or :class:`UnknownModelError` listing the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise UnknownModelError(f"unknown model {name!r}; served models are: {known}") from None
