"""The reference every serving path's feature maps are held to: the eager tutorial network
(models/networks.py, the committed weights) read with forward hooks on its modules."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from cnnserve.models.checkpoint import load_network
from cnnserve.models.features import FEATURE_LAYERS
from cnnserve.models.registry import get_spec, weights_path
from cnnserve.models.spec import Architecture

#: Largest max-abs difference from the eager maps any serving path may show.
TOLERANCE = 1e-4


def demo_network(model: str) -> torch.nn.Module:
    """The demo model's eager network with its committed weights (the default repository's
    version 1 is exported from them)."""
    return load_network(get_spec(model), weights_path(model)).eval()


def hooked_maps(network: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """Each feature map of ``network`` for the float32 batch ``x``, by layer name, as forward
    hooks on its modules see it, and its output under ``"output"``. The FCN's maps are taken
    after the ReLU its forward applies to each layer's output (what the next layer gets)."""
    architecture = Architecture.CONVNET if hasattr(network, "pool1") else Architecture.FCN
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[[torch.nn.Module, object, torch.Tensor], None]:
        def hook(_module: torch.nn.Module, _args: object, output: torch.Tensor) -> None:
            seen[name] = F.relu(output) if architecture is Architecture.FCN else output

        return hook

    handles = [
        getattr(network, name).register_forward_hook(keep(name))
        for name in FEATURE_LAYERS[architecture]
    ]
    try:
        with torch.inference_mode():
            output = network(torch.from_numpy(np.ascontiguousarray(x)))
    finally:
        for handle in handles:
            handle.remove()
    return {"output": output.numpy(), **{name: t.numpy() for name, t in seen.items()}}


def differences(
    got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]
) -> Iterator[tuple[str, float]]:
    """Each of ``got``'s maps and its max-abs difference from ``want``'s (shapes must agree)."""
    for name, array in got.items():
        assert array.shape == want[name].shape, (name, array.shape, want[name].shape)
        yield name, float(np.abs(array - want[name]).max())


def assert_close(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> None:
    """Every map of ``got`` within :data:`TOLERANCE` of ``want``'s."""
    worst = dict(differences(got, want))
    assert worst and all(diff < TOLERANCE for diff in worst.values()), worst
