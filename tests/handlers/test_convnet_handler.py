"""Serving a ConvNet: a digit image in, the right digit (the friendly top-k JSON) out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ts.context import Context

from cnnserve.handlers.service import ModelHandler
from cnnserve.models.registry import get_spec
from cnnserve.models.runtime import load_runner
from cnnserve.models.semantics import DEFAULT_TOP_K, ReplyOptions, render_reply
from cnnserve.models.steps import normalize, softmax

from ..images import digit_png
from .conftest import Archives, Unpacked
from .harness import call, entry_module, make_context, request, unpack

DIGITS = range(10)


@pytest.fixture(scope="module")
def model_dir(archives: Archives, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The convnet archive (TorchScript), unpacked."""
    return unpack(archives[("convnet", "torchscript")], tmp_path_factory.mktemp("convnet"))


def test_digits_come_back_right_with_the_in_process_probabilities(
    handler_and_context: tuple[ModelHandler, Context], model_dir: Path
) -> None:
    handler, context = handler_and_context
    spec = get_spec("convnet")
    runner = load_runner(model_dir / "model.pt", "torchscript", "cpu")
    images = [digit_png(i, invert=i % 2 == 1) for i in DIGITS]
    answers = call(handler.handle, context, [request(png) for png, _ in images])
    correct = 0
    for (png, label), answer in zip(images, answers, strict=True):
        assert answer.status == 200
        assert answer.content_type == "application/json"
        (prediction,) = json.loads(answer.body)["predictions"]
        ranked = prediction["top_k"]
        assert len(ranked) == DEFAULT_TOP_K
        logits = runner.infer(normalize(spec.image_to_pixels(png))[None])
        probabilities = softmax(logits)[0]
        best = int(np.argmax(probabilities))
        assert prediction["label"] == ranked[0]["label"] == spec.labels[best]
        assert ranked[0]["index"] == best
        assert ranked[0]["probability"] == pytest.approx(float(probabilities[best]), abs=1e-4)
        assert [p["probability"] for p in ranked] == sorted(
            (p["probability"] for p in ranked), reverse=True
        )
        # The reply is the shared renderer's, byte for byte.
        assert answer.body == render_reply(spec, logits, ReplyOptions()).body
        correct += prediction["label"] == str(label)
    assert correct >= 9  # the demo weights score 98% on held-out digits


def test_top_k_comes_from_the_x_top_k_header_or_a_top_k_input(
    handler_and_context: tuple[ModelHandler, Context],
) -> None:
    handler, context = handler_and_context
    png, _ = digit_png(4)
    answers = call(
        handler.handle,
        context,
        [
            request(png, headers={"X-Top-K": "10"}),
            request(png, headers={"x-top-k": "1"}),
            ({"body": bytearray(png), "top_k": bytearray(b"2")}, {}),
            request(png, headers={"X-Top-K": "many"}),
            request(png, headers={"X-Top-K": "0"}),
        ],
    )
    assert [a.status for a in answers] == [200, 200, 200, 400, 400]
    (ten,), (one,), (two,) = (json.loads(a.body)["predictions"] for a in answers[:3])
    assert sorted(p["label"] for p in ten["top_k"]) == [str(d) for d in range(10)]
    assert sum(p["probability"] for p in ten["top_k"]) == pytest.approx(1.0, abs=1e-3)
    assert one["top_k"] == ten["top_k"][:1]
    assert two["top_k"] == ten["top_k"][:2]
    errors = [json.loads(a.body)["message"] for a in answers[3:]]
    assert errors == [
        "X-Top-K must be an integer ≥ 1, got 'many'",
        "X-Top-K must be an integer ≥ 1, got '0'",
    ]


def test_the_archived_entry_file_serves_convnet(unpacked: Unpacked) -> None:
    """What TorchServe imports from the archive: ``handle`` loads on ``None``, then answers."""
    model_dir = unpacked("convnet", "onnx")
    context = make_context(model_dir)
    handle = entry_module(model_dir).handle
    assert handle(None, context) is None
    spec = get_spec("convnet")
    runner = load_runner(model_dir / "model.onnx", "onnx", "cpu")
    png, _ = digit_png(7)
    (answer,) = call(handle, context, [request(png)])
    best = int(np.argmax(runner.infer(normalize(spec.image_to_pixels(png))[None])[0]))
    assert answer.status == 200
    assert json.loads(answer.body)["predictions"][0]["label"] == spec.labels[best]
