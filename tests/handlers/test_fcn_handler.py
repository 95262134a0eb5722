"""The FCN entry point: an image in, its class mask (palette PNG) or pixel counts (JSON) out."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ts.context import Context

from cnnserve.handlers import fcn_handler
from cnnserve.handlers.service import ModelHandler
from cnnserve.models.registry import SHAPE_CLASSES, get_spec
from cnnserve.models.runtime import load_runner
from cnnserve.models.semantics import PIXEL_COUNTS_HEADER
from cnnserve.models.steps import class_mask, normalize

from ..images import encode, shapes_png
from .harness import call, make_context, request


@pytest.fixture(scope="module")
def handler_and_context(artifacts_dir: Path) -> tuple[ModelHandler, Context]:
    handler = ModelHandler("fcn")
    context = make_context("fcn", artifacts_dir, "fcn.pt")
    handler.handle(None, context)
    return handler, context


def reference_mask(artifacts_dir: Path, png: bytes) -> np.ndarray:
    """The mask the in-process pipeline computes for ``png``."""
    runner = load_runner(artifacts_dir / "fcn.pt", "torchscript", "cpu")
    scores = runner.infer(normalize(get_spec("fcn").image_to_pixels(png))[np.newaxis])
    return class_mask(scores)[0]


@pytest.mark.parametrize(("seed", "side"), [(1, 64), (2, 37), (3, 96)])
def test_mask_png_has_the_image_size_classes_and_counts(
    handler_and_context: tuple[ModelHandler, Context], artifacts_dir: Path, seed: int, side: int
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
    np.testing.assert_array_equal(mask, reference_mask(artifacts_dir, png))
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


def test_the_module_entry_point_serves_fcn(artifacts_dir: Path) -> None:
    context = make_context("fcn", artifacts_dir, "fcn.onnx")
    assert fcn_handler.handle(None, context) is None
    png, _ = shapes_png(7, 30)
    (answer,) = call(fcn_handler.handle, context, [request(png)])
    assert answer.status == 200
    mask = np.asarray(Image.open(io.BytesIO(answer.body)))
    np.testing.assert_array_equal(mask, reference_mask(artifacts_dir, png))
