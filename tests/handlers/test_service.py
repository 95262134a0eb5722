"""The shared handler core: TorchServe batches in, one reply per request out, errors isolated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ts.context import Context

from cnnserve.handlers.packing import PACKED_CONTENT_TYPE, PACKED_INPUT_NAME, pack, unpack_response
from cnnserve.handlers.service import ModelHandler, artifact_format_of
from cnnserve.models.registry import get_spec
from cnnserve.models.runtime import load_runner
from cnnserve.models.steps import normalize

from ..images import digit_png, shapes_png
from .harness import call, make_context, request

TOLERANCE = 1e-4


def items(count: int, height: int = 28, width: int = 28, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (count, 3, height, width)).astype(np.float32)


def convnet(artifacts_dir: Path, artifact: str = "convnet.pt") -> tuple[ModelHandler, Context]:
    handler = ModelHandler("convnet")
    context = make_context("convnet", artifacts_dir, artifact)
    assert handler.handle(None, context) is None
    return handler, context


@pytest.mark.parametrize("artifact", ["convnet.pt", "convnet.onnx"])
def test_initialization_loads_the_archived_artifact_on_the_cpu(
    artifacts_dir: Path, artifact: str
) -> None:
    handler, _ = convnet(artifacts_dir, artifact)
    assert handler.model is not None
    assert handler.model.artifact == artifacts_dir / artifact
    assert handler.model.artifact_format == artifact_format_of(Path(artifact))
    assert handler.model.runner.device in {"cpu", "CPUExecutionProvider"}
    assert not handler.model.half


def test_half_precision_without_a_gpu_runs_fp32(artifacts_dir: Path) -> None:
    handler = ModelHandler("convnet")
    context = make_context("convnet", artifacts_dir, "convnet.pt", {"half": True})
    handler.handle(None, context)
    assert handler.model is not None and not handler.model.half
    (answer,) = call(handler.handle, context, [request(pack(items(2)), PACKED_INPUT_NAME)])
    assert unpack_response(answer.body).shape == (2, 10)


def test_threads_option_bounds_the_worker_s_torch_threads(artifacts_dir: Path) -> None:
    # A worker process serves one model, so the handler sets torch's process-wide count.
    before = torch.get_num_threads()
    try:
        handler = ModelHandler("convnet")
        handler.handle(None, make_context("convnet", artifacts_dir, "convnet.pt", {"threads": 1}))
        assert torch.get_num_threads() == 1
        assert handler.model is not None
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("artifact", ["convnet.pt", "convnet.onnx"])
def test_uneven_packed_batches_each_get_their_own_outputs(
    artifacts_dir: Path, artifact: str
) -> None:
    handler, context = convnet(artifacts_dir, artifact)
    reference = load_runner(artifacts_dir / artifact, artifact_format_of(Path(artifact)), "cpu")
    batches = [items(2, seed=1), items(3, seed=2), items(1, seed=3)]
    answers = call(handler.handle, context, [request(pack(b), PACKED_INPUT_NAME) for b in batches])
    for batch, answer in zip(batches, answers, strict=True):
        assert answer.status == 200
        assert answer.content_type == PACKED_CONTENT_TYPE
        outputs = unpack_response(answer.body)
        assert outputs.shape == (len(batch), 10)
        assert np.abs(outputs - reference.infer(batch)).max() <= TOLERANCE


def test_direct_images_and_packed_batches_in_one_torchserve_batch(artifacts_dir: Path) -> None:
    handler, context = convnet(artifacts_dir)
    spec = get_spec("convnet")
    png, label = digit_png(3)
    packed = normalize(spec.image_to_pixels(png))[np.newaxis].repeat(2, axis=0)
    answers = call(
        handler.handle,
        context,
        [request(png), request(pack(packed), PACKED_INPUT_NAME), request(png, "data")],
    )
    assert [a.status for a in answers] == [200, 200, 200]
    assert answers[0].body == answers[2].body  # same image, same answer, either input name
    logits = unpack_response(answers[1].body)
    best = int(np.argmax(logits[0]))
    assert answers[0].content_type == "application/json"
    assert json.loads(answers[0].body)["predictions"][0]["top_k"][0]["index"] == best
    assert np.array_equal(logits[0], logits[1])
    assert best == label


def test_a_bad_request_fails_alone(artifacts_dir: Path) -> None:
    handler, context = convnet(artifacts_dir)
    png, _ = digit_png(0)
    good = items(2, seed=5)
    answers = call(
        handler.handle,
        context,
        [
            request(png),
            request(png[:60]),  # truncated PNG
            request(pack(items(2, 32, 32)), PACKED_INPUT_NAME),  # wrong size for the ConvNet
            request(pack(good), PACKED_INPUT_NAME),
            request({"json": "decoded"}),  # TorchServe decodes application/json bodies
            ({}, {}),  # no input at all
            request(b"GIF89a not accepted"),
        ],
    )
    assert [a.status for a in answers] == [200, 400, 400, 200, 400, 400, 400]
    errors = [a.body.decode() for a in answers if a.status == 400]
    assert all(a.content_type == "application/json" for a in answers if a.status == 400)
    assert "could not decode image" in errors[0]
    assert "convnet expects [N,3,28,28], got [N,3,32,32]" in errors[1]
    assert "must be binary" in errors[2]
    assert "request carries no input" in errors[3]
    assert "could not decode image" in errors[4]
    reference = load_runner(artifacts_dir / "convnet.pt", "torchscript", "cpu").infer(good)
    assert np.abs(unpack_response(answers[3].body) - reference).max() <= TOLERANCE


def test_an_all_bad_batch_still_answers_every_request(artifacts_dir: Path) -> None:
    handler, context = convnet(artifacts_dir)
    answers = call(handler.handle, context, [request(b""), request(b"x")])
    assert [a.status for a in answers] == [400, 400]
    assert "image is empty" in answers[0].body.decode()


def test_fcn_items_of_different_sizes_run_apart_and_come_back_in_order(
    artifacts_dir: Path,
) -> None:
    handler = ModelHandler("fcn")
    context = make_context("fcn", artifacts_dir, "fcn.pt")
    handler.handle(None, context)
    reference = load_runner(artifacts_dir / "fcn.pt", "torchscript", "cpu")
    batches = [items(2, 45, 64, seed=1), items(3, 7, 9, seed=2), items(1, 45, 64, seed=3)]
    png, _ = shapes_png(2, 40)
    answers = call(
        handler.handle,
        context,
        [*(request(pack(b), PACKED_INPUT_NAME) for b in batches), request(png)],
    )
    assert [a.status for a in answers] == [200, 200, 200, 200]
    for batch, answer in zip(batches, answers, strict=False):
        outputs = unpack_response(answer.body)
        assert outputs.shape == (len(batch), 4, *batch.shape[2:])
        assert np.abs(outputs - reference.infer(batch)).max() <= TOLERANCE
    assert answers[3].content_type == "image/png"


def test_artifact_format_follows_the_file_suffix() -> None:
    assert artifact_format_of(Path("m/convnet.pt")) == "torchscript"
    assert artifact_format_of(Path("fcn.onnx")) == "onnx"
    with pytest.raises(ValueError, match="not an exported artifact"):
        artifact_format_of(Path("fcn.pth"))
