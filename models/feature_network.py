"""The module the feature artifacts are exported from: a network that answers its output and
every feature map (:mod:`.features`) at once.

It runs the tutorial network's own layers in its ``forward``'s order, keeping what each layer
hands on; tests/models/test_feature_network.py holds it to the network (the same output, bit
for bit) and to forward hooks on the network's modules (the same maps).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .features import FEATURE_LAYERS, NETWORK_OUTPUT
from .networks import FCN, ConvNet
from .spec import Architecture


class FeatureNetwork(nn.Module):
    """``x`` → ``{"output": network output, "conv1": map, ...}``, the maps in
    :data:`~.features.FEATURE_LAYERS` order. It shares ``network``'s parameters (no copy)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        if isinstance(network, ConvNet):
            self.architecture = Architecture.CONVNET
            self._steps: list[Callable[[torch.Tensor], torch.Tensor]] = [
                network.conv1,
                network.pool1,
                network.conv2,
                network.pool2,
                lambda x: network.fc1(network.flatten(x)),
                network.fc2,
            ]
        elif isinstance(network, FCN):
            self.architecture = Architecture.FCN
            # The tutorial's FCN applies F.relu after every layer, the last one included.
            layers = [
                network.conv1,
                network.conv2,
                network.conv3,
                network.unsample1,
                network.unsample2,
                network.unsample3,
            ]
            self._steps = [_relu_after(layer) for layer in layers]
        else:
            raise TypeError(f"no feature maps for a {type(network).__name__}")

    @property
    def layers(self) -> tuple[str, ...]:
        """The feature maps' names, in the order :meth:`forward` answers them."""
        return FEATURE_LAYERS[self.architecture]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The network's output, then each feature map, by name."""
        maps = {}
        for layer, step in zip(self.layers, self._steps[:-1], strict=True):
            x = step(x)
            maps[layer] = x
        return {NETWORK_OUTPUT: self._steps[-1](x), **maps}


def _relu_after(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: F.relu(layer(x))
