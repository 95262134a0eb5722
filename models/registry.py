"""The two demo models: their configs, built from the committed weights in ``weights/``.

They are two entries like any model of a repository (:mod:`.repository`): a config each, the
class count of their checkpoints. Training and the default repository start from here.
"""

from __future__ import annotations

from pathlib import Path

from cnnserve.errors import UnknownModelError

from .repository import ModelConfig, build_spec
from .spec import Architecture, ModelSpec

WEIGHTS_DIR = Path(__file__).parent / "weights"

SHAPE_CLASSES = ("background", "solid", "outline", "striped")

#: The demo models' configs, as ``cnnserve export`` writes them into the default repository.
DEMO_CONFIGS: dict[str, ModelConfig] = {
    "convnet": ModelConfig(
        architecture=Architecture.CONVNET, labels=[str(digit) for digit in range(10)]
    ),
    "fcn": ModelConfig(architecture=Architecture.FCN, labels=list(SHAPE_CLASSES)),
}

MODELS: dict[str, ModelSpec] = {
    name: build_spec(name, config, len(config.labels or ()))
    for name, config in DEMO_CONFIGS.items()
}


def weights_path(name: str) -> Path:
    """The committed checkpoint of a demo model."""
    return WEIGHTS_DIR / f"{name}.pt"


def get_spec(name: str) -> ModelSpec:
    """The spec of a demo model, or :class:`UnknownModelError` listing the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise UnknownModelError(f"unknown model {name!r}; served models are: {known}") from None
