"""What the outputs mean: tasks, ranking, pixel counts, the probe input, friendly replies."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from cnnserve.errors import InvalidInputError
from cnnserve.models.registry import MODELS, SHAPE_CLASSES, get_spec
from cnnserve.models.semantics import (
    DEFAULT_TOP_K,
    PIXEL_COUNTS_HEADER,
    MaskFormat,
    ReplyOptions,
    parse_options,
    pixel_counts,
    probe_input,
    ranked,
    render_reply,
    top_k,
)
from cnnserve.models.spec import Task
from cnnserve.models.steps import softmax


def test_each_model_declares_its_task() -> None:
    assert {name: spec.task for name, spec in MODELS.items()} == {
        "convnet": Task.CLASSIFICATION,
        "fcn": Task.SEGMENTATION,
    }


def test_ranking_is_largest_first_and_keeps_class_order_on_ties() -> None:
    values = np.array([[0.1, 0.7, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]], dtype=np.float32)
    assert ranked(values, 3).tolist() == [[1, 0, 2], [0, 1, 2]]
    assert ranked(values, 9).shape == (2, 4)


def test_top_k_ranks_by_softmax_probability() -> None:
    logits = np.array([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]], dtype=np.float32)
    first, second = top_k(logits, ("a", "b", "c"), k=2)
    assert (first.labels, first.indices) == (("b", "c"), (1, 2))
    assert (second.labels, second.indices) == (("a", "b"), (0, 1))
    assert first.probabilities[0] == pytest.approx(float(softmax(logits)[0, 1]))
    assert sum(top_k(logits, ("a", "b", "c"), k=10)[0].probabilities) == pytest.approx(1.0)


def test_pixel_counts_per_image_of_a_batch() -> None:
    masks = np.array([[[0, 2], [2, 2]], [[1, 1], [1, 0]]], dtype=np.uint8)
    counts = pixel_counts(masks, 4)
    assert counts.dtype == np.int64
    assert counts.tolist() == [[1, 0, 3, 0], [1, 3, 0, 0]]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_probe_input_is_the_smallest_accepted_batch(model: str) -> None:
    spec = get_spec(model)
    probe = probe_input(spec)
    assert probe.dtype == np.float32
    assert probe.shape == (1, 3, spec.min_side, spec.min_side)
    assert not probe.any()
    spec.check_item_shape(probe.shape[1:])


def test_options_default_when_absent() -> None:
    assert parse_options({"user-agent": "curl"}) == ReplyOptions(DEFAULT_TOP_K, MaskFormat.PNG)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"top_k": "5"}, ReplyOptions(top_k=5)),
        ({"x-top-k": " 1 "}, ReplyOptions(top_k=1)),
        ({"format": "json"}, ReplyOptions(format=MaskFormat.JSON)),
        ({"x-format": "png", "x-top-k": "2"}, ReplyOptions(2, MaskFormat.PNG)),
        # The option's own name wins over its header.
        ({"top_k": "4", "x-top-k": "7"}, ReplyOptions(top_k=4)),
    ],
)
def test_options_by_name_or_header(values: dict[str, str], expected: ReplyOptions) -> None:
    assert parse_options(values) == expected


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"top_k": "0"}, "top_k must be an integer ≥ 1, got '0'"),
        ({"x-top-k": "many"}, "X-Top-K must be an integer ≥ 1, got 'many'"),
        ({"top_k": "-2"}, "top_k must be an integer ≥ 1, got '-2'"),
        ({"top_k": "²"}, "top_k must be an integer ≥ 1, got '²'"),
        # More digits than int() reads (4,300): refused, not raised as ValueError.
        ({"top_k": "1" * 5000}, f"top_k must be an integer ≥ 1, got '{'1' * 40}'"),
        ({"format": "gif"}, "format must be png or json, got 'gif'"),
        ({"x-format": "JSON"}, "X-Format must be png or json, got 'JSON'"),
    ],
)
def test_bad_options_are_named_as_sent(values: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidInputError) as raised:
        parse_options(values)
    assert str(raised.value) == message


def test_classification_reply_lists_top_k_per_image_with_rounded_probabilities() -> None:
    spec = get_spec("convnet")
    logits = np.zeros((2, 10), dtype=np.float32)
    logits[0, 7] = 6.0
    logits[0, 1] = 4.0
    logits[1, 3] = 1.0
    reply = render_reply(spec, logits, ReplyOptions(top_k=2))
    assert reply.content_type == "application/json"
    assert b" " not in reply.body  # compact: both servers write the same bytes
    first, second = json.loads(reply.body)["predictions"]
    probabilities = softmax(logits)
    assert first == {
        "label": "7",
        "top_k": [
            {"label": "7", "index": 7, "probability": round(float(probabilities[0, 7]), 4)},
            {"label": "1", "index": 1, "probability": round(float(probabilities[0, 1]), 4)},
        ],
    }
    assert [p["index"] for p in second["top_k"]] == [3, 0]  # ties: lower index first
    assert json.loads(reply.body)["model"] == "convnet"


def _scores(masks: np.ndarray) -> np.ndarray:
    """FCN scores whose argmax is ``masks``."""
    scores = np.zeros((len(masks), len(SHAPE_CLASSES), *masks.shape[1:]), dtype=np.float32)
    np.put_along_axis(scores, masks[:, None].astype(np.int64), 1.0, axis=1)
    return scores


def test_segmentation_reply_is_a_palette_png_of_class_indices_with_counts() -> None:
    mask = np.random.default_rng(0).integers(0, len(SHAPE_CLASSES), (9, 13)).astype(np.uint8)
    reply = render_reply(get_spec("fcn"), _scores(mask[None]), ReplyOptions())
    assert reply.content_type == "image/png"
    image = Image.open(io.BytesIO(reply.body))
    assert (image.mode, image.size) == ("P", (13, 9))
    np.testing.assert_array_equal(np.asarray(image), mask)
    counts = json.loads(reply.headers[PIXEL_COUNTS_HEADER])
    assert counts == {name: int((mask == i).sum()) for i, name in enumerate(SHAPE_CLASSES)}


def test_segmentation_json_reply_counts_every_image() -> None:
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[1, :2] = 3
    reply = render_reply(get_spec("fcn"), _scores(masks), ReplyOptions(format=MaskFormat.JSON))
    assert reply.content_type == "application/json"
    assert json.loads(reply.body) == {
        "model": "fcn",
        "predictions": [
            {"counts": {"background": 64, "solid": 0, "outline": 0, "striped": 0}},
            {"counts": {"background": 48, "solid": 0, "outline": 0, "striped": 16}},
        ],
    }


def test_a_png_reply_holds_one_mask() -> None:
    with pytest.raises(InvalidInputError, match="a PNG answer holds one mask; got 2 images"):
        render_reply(get_spec("fcn"), _scores(np.zeros((2, 8, 8), np.uint8)), ReplyOptions())
