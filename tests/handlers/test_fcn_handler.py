"""Serving an FCN: an image in, its class mask (palette PNG) or pixel counts (JSON) out."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ts.context import Context

from cnnserve.handlers.service import ModelHandler
from cnnserve.models.registry import SHAPE_CLASSES, get_spec
from cnnserve.models.runtime import load_runner
from cnnserve.models.semantics import PIXEL_COUNTS_HEADER
from cnnserve.models.steps import class_mask, normalize

from ..images import encode, shapes_png
from .conftest import Archives, Unpacked
from .harness import call, entry_module, make_context, request, unpack


@pytest.fixture(scope="module")
def model_dir(archives: Archives, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fcn archive (TorchScript), unpacked."""
    return unpack(archives[("fcn", "torchscript")], tmp_path_factory.mktemp("fcn"))


def reference_mask(model_dir: Path, png: bytes) -> np.ndarray:
    """The mask the in-process pipeline computes for ``png`` with the archived artifact."""
    runner = load_runner(model_dir / "model.pt", "torchscript", "cpu")
    scores = runner.infer(normalize(get_spec("fcn").image_to_pixels(png))[np.newaxis])
    return class_mask(scores)[0]


@pytest.mark.parametrize(("seed", "side"), [(1, 64), (2, 37), (3, 96)])
def test_mask_png_has_the_image_size_classes_and_counts(
    handler_and_context: tuple[ModelHandler, Context], model_dir: Path, seed: int, side: int
) -> None:
    handler, context = handler_and_context
    png, truth = shapes_png(seed, side)
    (answer,) = call(handler.handle, context, [request(png)])
    assert answer.status == 200
    assert answer.content_type == "image/png"
    image = Image.open(io.BytesIO(answer.body))
    assert image.mode == "P"
    assert image.size == (side, side)
    mask = np.asarray(image)
    assert set(np.unique(mask)) <= set(range(len(SHAPE_CLASSES)))
    np.testing.assert_array_equal(mask, reference_mask(model_dir, png))
    counts = json.loads(answer.headers[PIXEL_COUNTS_HEADER])
    assert list(counts) == list(SHAPE_CLASSES)
    assert counts == {name: int((mask == i).sum()) for i, name in enumerate(SHAPE_CLASSES)}
    assert mask.shape == truth.shape


def test_pixel_counts_as_json_when_asked(
    handler_and_context: tuple[ModelHandler, Context],
) -> None:
    handler, context = handler_and_context
    png, _ = shapes_png(4, 48)
    as_png, as_json, by_input, bad = call(
        handler.handle,
        context,
        [
            request(png),
            request(png, headers={"X-Format": "json"}),
            ({"body": bytearray(png), "format": bytearray(b"json")}, {}),
            request(png, headers={"X-Format": "gif"}),
        ],
    )
    assert as_json.content_type == "application/json"
    assert json.loads(as_json.body) == {
        "model": "fcn",
        "predictions": [{"counts": json.loads(as_png.headers[PIXEL_COUNTS_HEADER])}],
    }
    assert by_input.body == as_json.body
    assert bad.status == 400
    assert json.loads(bad.body)["message"] == "X-Format must be png or json, got 'gif'"


def test_images_outside_the_size_range_fail_alone(
    handler_and_context: tuple[ModelHandler, Context],
) -> None:
    handler, context = handler_and_context
    tiny = encode(np.zeros((5, 40, 3), np.uint8))
    huge = encode(np.zeros((8, 600, 3), np.uint8))
    png, _ = shapes_png(5, 32)
    answers = call(handler.handle, context, [request(tiny), request(png), request(huge)])
    assert [a.status for a in answers] == [400, 200, 400]
    assert (
        "fcn expects [N,3,H,W] with 7 ≤ H, W ≤ 512, got [N,3,5,40]"
        in json.loads(answers[0].body)["message"]
    )
    assert "got [N,3,8,600]" in json.loads(answers[2].body)["message"]


def test_jpeg_is_accepted(handler_and_context: tuple[ModelHandler, Context]) -> None:
    handler, context = handler_and_context
    image, _ = shapes_png(6, 40)
    jpeg = encode(np.asarray(Image.open(io.BytesIO(image)).convert("RGB")), fmt="JPEG")
    (answer,) = call(handler.handle, context, [request(jpeg)])
    assert answer.status == 200
    assert Image.open(io.BytesIO(answer.body)).size == (40, 40)


def test_the_archived_entry_file_serves_fcn(unpacked: Unpacked, model_dir: Path) -> None:
    onnx_dir = unpacked("fcn", "onnx")
    context = make_context(onnx_dir)
    handle = entry_module(onnx_dir).handle
    assert handle(None, context) is None
    png, _ = shapes_png(7, 30)
    (answer,) = call(handle, context, [request(png)])
    assert answer.status == 200
    mask = np.asarray(Image.open(io.BytesIO(answer.body)))
    np.testing.assert_array_equal(mask, reference_mask(model_dir, png))
