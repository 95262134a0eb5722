"""The module the feature artifacts are exported from answers the network's own output and the
maps forward hooks on the network's modules see."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnserve.models.feature_network import FeatureNetwork
from cnnserve.models.features import FEATURE_LAYERS
from tests.feature_maps import demo_network, hooked_maps


@pytest.mark.parametrize(("model", "side"), [("convnet", 28), ("fcn", 7), ("fcn", 33)])
def test_output_and_maps_are_the_networks_exactly(model: str, side: int) -> None:
    network = demo_network(model)
    features = FeatureNetwork(network).eval()
    x = np.random.default_rng(side).standard_normal((3, 3, side, side), dtype=np.float32)
    with torch.inference_mode():
        answered = {name: t.numpy() for name, t in features(torch.from_numpy(x)).items()}
    eager = hooked_maps(network, x)
    assert list(answered) == ["output", *FEATURE_LAYERS[features.architecture]]
    for name, array in answered.items():
        np.testing.assert_array_equal(array, eager[name], err_msg=name)


def test_other_modules_have_no_feature_maps() -> None:
    with pytest.raises(TypeError, match="no feature maps for a Linear"):
        FeatureNetwork(torch.nn.Linear(2, 2))
