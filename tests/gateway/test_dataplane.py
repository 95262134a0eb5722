"""The data plane on the real exported models (ONNX Runtime on the CPU).

Every input form, every output, the defaults, top-k, the FCN at several sizes, each
validation error with its class and message, deadlines, draining and metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from cnnserve.errors import (
    DeadlineExceededError,
    InvalidInputError,
    OverloadedError,
    PayloadTooLargeError,
    UnavailableError,
    UnknownModelError,
)
from cnnserve.gateway.dataplane import DataPlane, create_core
from cnnserve.models.registry import get_spec
from cnnserve.models.steps import normalize, softmax
from cnnserve.protocol.domain import DATATYPES, InferRequest, RequestedOutput, Tensor
from cnnserve.settings import Settings
from tests.conftest import RunningTorchServe
from tests.images import digit_png, encode, shapes_png
from tests.support import wait_until_async

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_ITEMS = 16
CONVNET = get_spec("convnet")


def settings_for(repository: Path, **overrides: object) -> Settings:
    """Settings for a test core serving ``repository``: the CPU, small limits, a short
    batching delay."""
    values: dict[str, object] = {
        "model_repository": repository,
        "backend": "onnxruntime",
        "device": "cpu",
        "max_items_per_request": MAX_ITEMS,
        "max_batch_delay_ms": 5,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def core(model_repository: Path) -> AsyncIterator[DataPlane]:
    """One started core shared by this module's tests."""
    started = await create_core(settings_for(model_repository))
    await started.start()
    yield started
    await started.stop(grace_s=5)


def tensor(name: str, data: np.ndarray, datatype: str | None = None) -> Tensor:
    """A request tensor; the datatype follows the array unless given."""
    if datatype is None:
        datatype = next(k for k, v in DATATYPES.items() if v == data.dtype and k != "BYTES")
    return Tensor(name, datatype, tuple(data.shape), data)


def images(*encoded: bytes) -> Tensor:
    """A BYTES ``image`` input of encoded images."""
    data = np.empty(len(encoded), dtype=object)
    data[:] = list(encoded)
    return Tensor("image", "BYTES", (len(encoded),), data)


def request(
    model: str, *inputs: Tensor, outputs: list[RequestedOutput] | None = None, **kw: object
) -> InferRequest:
    """An inference request."""
    return InferRequest(model, list(inputs), outputs, **kw)  # type: ignore[arg-type]


def by_name(response_outputs: list[Tensor]) -> dict[str, Tensor]:
    """Output tensors by name."""
    return {t.name: t for t in response_outputs}


def digit_pixels(*indices: int) -> tuple[np.ndarray, list[int]]:
    """Held-out digits prepared as ConvNet pixels (``N×3×28×28`` uint8) and their labels."""
    pngs = [digit_png(i) for i in indices]
    pixels = np.stack([CONVNET.image_to_pixels(png) for png, _ in pngs])
    return pixels, [label for _, label in pngs]


# --- input forms and outputs ---


async def test_digit_png_classifies_correctly(core: DataPlane) -> None:
    pngs = [digit_png(i) for i in range(4)] + [digit_png(4, invert=True)]
    response = await core.infer(request("convnet", images(*(png for png, _ in pngs))))
    labels = by_name(response.outputs)["labels"]
    assert labels.datatype == "BYTES"
    assert labels.shape == (5, 1)
    assert [row[0].decode() for row in labels.data] == [str(label) for _, label in pngs]
    assert response.model_name == "convnet"
    assert response.model_version == "1"


async def test_three_input_forms_give_the_same_answer(core: DataPlane) -> None:
    pixels, _ = digit_pixels(5, 6, 7)
    pngs = [digit_png(i)[0] for i in (5, 6, 7)]
    logits = [RequestedOutput("logits")]
    answers = [
        await core.infer(request("convnet", form, outputs=logits))
        for form in (
            tensor("input", normalize(pixels)),
            tensor("pixels", pixels),
            images(*pngs),
        )
    ]
    first = answers[0].outputs[0].data
    assert first.shape == (3, 10)
    for other in answers[1:]:
        np.testing.assert_allclose(other.outputs[0].data, first, atol=1e-5)


async def test_torchscript_core_sends_pixels_to_the_backend_with_the_same_answers(
    model_repository: Path,
) -> None:
    # device_preprocess: UINT8 and image inputs travel as uint8 and are normalized by the
    # runner; FP32 inputs of the same shape are batched apart and agree with them.
    ts_core = await create_core(settings_for(model_repository, backend="torchscript"))
    await ts_core.start()
    try:
        assert ts_core.backend.takes_pixels(ts_core.models.version("convnet"))
        pixels, labels = digit_pixels(1, 2, 3)
        logits = [RequestedOutput("logits")]
        forms = (tensor("input", normalize(pixels)), tensor("pixels", pixels))
        answers = await asyncio.gather(
            *(ts_core.infer(request("convnet", form, outputs=logits)) for form in forms),
            ts_core.infer(request("convnet", images(*(digit_png(i)[0] for i in (1, 2, 3))))),
        )
    finally:
        await ts_core.stop(grace_s=5)
    np.testing.assert_allclose(answers[1].outputs[0].data, answers[0].outputs[0].data, atol=1e-5)
    assert [int(row[0]) for row in by_name(answers[2].outputs)["labels"].data] == labels


async def test_convnet_defaults_are_labels_and_probabilities(core: DataPlane) -> None:
    pixels, labels = digit_pixels(8, 9)
    response = await core.infer(request("convnet", tensor("pixels", pixels)))
    outputs = by_name(response.outputs)
    assert list(outputs) == ["labels", "probabilities"]
    probabilities = outputs["probabilities"]
    assert (probabilities.datatype, probabilities.shape) == ("FP32", (2, 10))
    np.testing.assert_allclose(probabilities.data.sum(axis=1), 1.0, rtol=1e-5)
    assert [int(row[0]) for row in outputs["labels"].data] == labels


async def test_every_convnet_output_is_consistent(core: DataPlane) -> None:
    pixels, labels = digit_pixels(10, 11, 12)
    wanted = [
        RequestedOutput("logits"),
        RequestedOutput("probabilities"),
        RequestedOutput("labels", {"top_k": 3}),
    ]
    response = await core.infer(request("convnet", tensor("pixels", pixels), outputs=wanted))
    outputs = by_name(response.outputs)
    assert [t.name for t in response.outputs] == ["logits", "probabilities", "labels"]
    logits = outputs["logits"].data
    np.testing.assert_allclose(outputs["probabilities"].data, softmax(logits), rtol=1e-6)
    top = outputs["labels"]
    assert top.shape == (3, 3)
    expected = np.argsort(-logits, axis=1, kind="stable")[:, :3]
    assert [[int(label) for label in row] for row in top.data] == expected.tolist()
    assert [int(row[0]) for row in top.data] == labels


async def test_triton_classification_parameter(core: DataPlane) -> None:
    pixels, labels = digit_pixels(13, 14)
    wanted = [
        RequestedOutput("probabilities", {"classification": 2}),
        RequestedOutput("labels", {"classification": 4}),
    ]
    response = await core.infer(request("convnet", tensor("pixels", pixels), outputs=wanted))
    outputs = by_name(response.outputs)
    classified = outputs["probabilities"]
    assert (classified.datatype, classified.shape) == ("BYTES", (2, 2))
    plain = await core.infer(
        request("convnet", tensor("pixels", pixels), outputs=[RequestedOutput("probabilities")])
    )
    probabilities = plain.outputs[0].data
    for n, row in enumerate(classified.data):
        value, index, label = row[0].decode().split(":")
        assert int(index) == labels[n]
        assert label == str(labels[n])
        assert float(value) == pytest.approx(probabilities[n].max(), abs=1e-6)
        assert float(row[0].split(b":")[0]) >= float(row[1].split(b":")[0])
    assert outputs["labels"].shape == (2, 4)


async def test_top_k_above_the_class_count_gives_every_class(core: DataPlane) -> None:
    pixels, _ = digit_pixels(15)
    wanted = [RequestedOutput("labels", {"top_k": 50})]
    response = await core.infer(request("convnet", tensor("pixels", pixels), outputs=wanted))
    row = response.outputs[0].data[0]
    assert sorted(int(label) for label in row) == list(range(10))


@pytest.mark.parametrize(("height", "width"), [(7, 7), (28, 45), (64, 64)])
async def test_fcn_outputs_at_several_sizes(core: DataPlane, height: int, width: int) -> None:
    rng = np.random.default_rng(height * width)
    pixels = rng.integers(0, 256, (2, 3, height, width), dtype=np.uint8)
    wanted = [RequestedOutput("scores"), RequestedOutput("mask"), RequestedOutput("counts")]
    response = await core.infer(request("fcn", tensor("pixels", pixels), outputs=wanted))
    outputs = by_name(response.outputs)
    scores, mask, counts = outputs["scores"], outputs["mask"], outputs["counts"]
    assert (scores.datatype, scores.shape) == ("FP32", (2, 4, height, width))
    assert (mask.datatype, mask.shape) == ("UINT8", (2, height, width))
    assert (counts.datatype, counts.shape) == ("INT64", (2, 4))
    np.testing.assert_array_equal(mask.data, scores.data.argmax(axis=1))
    for n in range(2):
        assert counts.data[n].tolist() == np.bincount(mask.data[n].ravel(), minlength=4).tolist()
    assert counts.data.sum(axis=1).tolist() == [height * width] * 2


async def test_fcn_defaults_are_mask_and_counts_and_segment_a_scene(core: DataPlane) -> None:
    png, truth = shapes_png(seed=3, side=64)
    response = await core.infer(request("fcn", images(png)))
    outputs = by_name(response.outputs)
    assert list(outputs) == ["mask", "counts"]
    mask = outputs["mask"].data[0]
    assert mask.shape == truth.shape
    assert float((mask == truth).mean()) > 0.8


async def test_fcn_requests_of_different_sizes_run_concurrently(core: DataPlane) -> None:
    sizes = [(16, 16), (20, 24), (16, 16), (33, 17)]
    batches = [
        np.random.default_rng(i).integers(0, 256, (i + 1, 3, h, w), dtype=np.uint8)
        for i, (h, w) in enumerate(sizes)
    ]
    wanted = [RequestedOutput("scores")]
    together = await asyncio.gather(
        *(core.infer(request("fcn", tensor("pixels", b), outputs=wanted)) for b in batches)
    )
    for batch, response in zip(batches, together, strict=True):
        alone = await core.backend.infer_batch(core.models.version("fcn"), normalize(batch))
        np.testing.assert_allclose(response.outputs[0].data, alone, atol=1e-5)


async def test_concurrent_requests_are_batched(model_repository: Path) -> None:
    # Its own core with a longer delay, so the batch-size metric is this test's alone.
    core = await create_core(settings_for(model_repository, max_batch_delay_ms=50))
    await core.start()
    try:
        pixels, labels = digit_pixels(*range(12))
        responses = await asyncio.gather(
            *(
                core.infer(request("convnet", tensor("pixels", pixels[i : i + 1])))
                for i in range(12)
            )
        )
    finally:
        await core.stop(grace_s=5)
    assert [int(by_name(r.outputs)["labels"].data[0, 0]) for r in responses] == labels
    sample = core.metrics.registry.get_sample_value
    convnet = {"model": "convnet", "version": "1"}
    batches = sample("cnnserve_batch_size_count", convnet)
    assert batches is not None
    assert batches < 12
    assert sample("cnnserve_batch_size_sum", convnet) == 12
    assert sample("cnnserve_requests_total", {**convnet, "outcome": "success"}) == 12


# --- validation: each error with its class and message ---

FP32_28 = np.zeros((1, 3, 28, 28), dtype=np.float32)


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: request("resnet", tensor("input", FP32_28)), UnknownModelError, "unknown model"),
        (
            lambda: request("convnet", tensor("input", FP32_28), model_version="2"),
            UnknownModelError,
            "convnet has no version '2'; available versions: 1",
        ),
        (lambda: request("convnet"), InvalidInputError, "exactly one input to convnet, got 0"),
        (
            lambda: request(
                "convnet",
                tensor("input", FP32_28),
                tensor("pixels", np.zeros((1, 3, 28, 28), np.uint8)),
            ),
            InvalidInputError,
            r"exactly one input to convnet, got 2 \(input, pixels\)",
        ),
        (
            lambda: request("convnet", tensor("picture", FP32_28)),
            InvalidInputError,
            r"unknown input 'picture' for convnet; accepted: input \(FP32 \[N,3,28,28\]\)",
        ),
        (
            lambda: request("convnet", tensor("input", FP32_28.astype(np.float64))),
            InvalidInputError,
            "input 'input' must be FP32, got FP64",
        ),
        (
            lambda: request("convnet", tensor("pixels", FP32_28)),
            InvalidInputError,
            "input 'pixels' must be UINT8, got FP32",
        ),
        (
            lambda: request("convnet", tensor("input", np.zeros((1, 3, 32, 32), np.float32))),
            InvalidInputError,
            r"convnet expects FP32 \[N,3,28,28\], got FP32 \[1,3,32,32\]",
        ),
        (
            lambda: request("convnet", tensor("input", np.zeros((1, 1, 28, 28), np.float32))),
            InvalidInputError,
            r"convnet expects FP32 \[N,3,28,28\], got FP32 \[1,1,28,28\]",
        ),
        (
            lambda: request("convnet", tensor("input", np.zeros((3, 28, 28), np.float32))),
            InvalidInputError,
            r"expects FP32 \[N,3,28,28\] for input 'input', got FP32 \[3,28,28\]",
        ),
        (
            lambda: request("convnet", tensor("input", np.zeros((0, 3, 28, 28), np.float32))),
            InvalidInputError,
            r"has no items \(N = 0\)",
        ),
        (
            lambda: request("fcn", tensor("pixels", np.zeros((1, 3, 5, 9), np.uint8))),
            InvalidInputError,
            r"fcn expects UINT8 \[N,3,H,W\] with 7 ≤ H, W ≤ 512, got UINT8 \[1,3,5,9\]",
        ),
        (
            lambda: request(
                "convnet", tensor("input", np.full((1, 3, 28, 28), np.nan, np.float32))
            ),
            InvalidInputError,
            "contains NaN or infinite values",
        ),
        (
            lambda: request("fcn", tensor("input", np.full((1, 3, 8, 8), np.inf, np.float32))),
            InvalidInputError,
            "contains NaN or infinite values",
        ),
        (
            lambda: request("convnet", images(digit_png(0)[0], b"not an image")),
            InvalidInputError,
            "image 1: could not decode image",
        ),
        (
            lambda: request("convnet", images(b"")),
            InvalidInputError,
            r"image 0: image is empty \(0 bytes\)",
        ),
        (
            lambda: request("fcn", images(shapes_png(1, 32)[0], shapes_png(1, 40)[0])),
            InvalidInputError,
            "must share one size .* image 0 is 32×32, image 1 is 40×40; send them in separate",
        ),
        (
            lambda: request("fcn", images(encode(np.zeros((600, 20, 3), np.uint8)))),
            InvalidInputError,
            r"image 0: fcn expects \[N,3,H,W\] with 7 ≤ H, W ≤ 512, got \[N,3,600,20\]",
        ),
        (
            lambda: request("convnet", tensor("input", FP32_28), outputs=[RequestedOutput("mask")]),
            InvalidInputError,
            "unknown output 'mask' for convnet; valid outputs: logits, probabilities, labels",
        ),
        (
            lambda: request(
                "fcn",
                tensor("input", np.zeros((1, 3, 8, 8), np.float32)),
                outputs=[RequestedOutput("mask"), RequestedOutput("mask")],
            ),
            InvalidInputError,
            "output 'mask' is requested more than once",
        ),
        (
            lambda: request(
                "convnet",
                tensor("input", FP32_28),
                outputs=[RequestedOutput("labels", {"top_k": 0})],
            ),
            InvalidInputError,
            "parameter 'top_k' of output 'labels' must be an integer ≥ 1, got 0",
        ),
        (
            lambda: request(
                "convnet",
                tensor("input", FP32_28),
                outputs=[RequestedOutput("labels", {"top_k": True})],
            ),
            InvalidInputError,
            "must be an integer ≥ 1, got True",
        ),
        (
            lambda: request(
                "convnet",
                tensor("input", FP32_28),
                outputs=[RequestedOutput("logits", {"top_k": 2})],
            ),
            InvalidInputError,
            "output 'logits' does not take parameter 'top_k'",
        ),
        (
            lambda: request("convnet", tensor("input", FP32_28), parameters={"timeout": "soon"}),
            InvalidInputError,
            "parameter 'timeout' must be an integer of microseconds from 0 to "
            '18446744073709551615, got "soon"',
        ),
        (
            lambda: request(
                "convnet", tensor("input", np.zeros((MAX_ITEMS + 1, 3, 28, 28), np.float32))
            ),
            PayloadTooLargeError,
            f"request has {MAX_ITEMS + 1} items; the limit is {MAX_ITEMS} per request",
        ),
    ],
)
async def test_bad_requests_get_clear_errors(
    core: DataPlane, build: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        await core.infer(build())  # type: ignore[operator]


async def test_one_bad_request_does_not_affect_concurrent_good_ones(core: DataPlane) -> None:
    pixels, labels = digit_pixels(20, 21)
    good = [core.infer(request("convnet", tensor("pixels", pixels[i : i + 1]))) for i in range(2)]
    bad = core.infer(request("convnet", images(b"\x89PNG broken")))
    first, broken, second = await asyncio.gather(good[0], bad, good[1], return_exceptions=True)
    assert isinstance(broken, InvalidInputError)
    for response, label in ((first, labels[0]), (second, labels[1])):
        assert not isinstance(response, BaseException)
        assert int(by_name(response.outputs)["labels"].data[0, 0]) == label


async def test_errors_are_counted_by_outcome(core: DataPlane) -> None:
    sample = core.metrics.registry.get_sample_value
    labels = {"model": "convnet", "version": "1", "outcome": "invalid_input"}
    before = sample("cnnserve_requests_total", labels) or 0
    with pytest.raises(InvalidInputError):
        await core.infer(request("convnet", tensor("input", np.zeros((1, 3, 9, 9), np.float32))))
    assert sample("cnnserve_requests_total", labels) == before + 1
    unknown = {"model": "_unknown", "version": "_unknown", "outcome": "unknown_model"}
    before = sample("cnnserve_requests_total", unknown) or 0
    with pytest.raises(UnknownModelError):
        await core.infer(request("no-such-model", tensor("input", FP32_28)))
    assert sample("cnnserve_requests_total", unknown) == before + 1


# --- deadlines ---


async def test_passed_deadline_is_never_computed(core: DataPlane) -> None:
    sample = core.metrics.registry.get_sample_value
    convnet = {"model": "convnet", "version": "1"}
    before = sample("cnnserve_expired_before_compute_total", convnet) or 0
    with pytest.raises(DeadlineExceededError):
        await core.infer(
            request("convnet", tensor("input", FP32_28), deadline=time.monotonic() - 1)
        )
    with pytest.raises(DeadlineExceededError):
        # The OIP timeout parameter, in microseconds: 1 µs is over before the request queues.
        await core.infer(request("convnet", tensor("input", FP32_28), parameters={"timeout": 1}))
    assert sample("cnnserve_expired_before_compute_total", convnet) == before + 2
    deadline_exceeded = {**convnet, "outcome": "deadline_exceeded"}
    assert (sample("cnnserve_requests_total", deadline_exceeded) or 0) >= 2


async def test_generous_deadlines_and_zero_timeout_are_served(core: DataPlane) -> None:
    later = time.monotonic() + 60
    for extra in (
        {"deadline": later},
        {"parameters": {"timeout": 0}},
        {"parameters": {"timeout": 60_000_000}},
    ):
        response = await core.infer(request("convnet", tensor("input", FP32_28), **extra))
        assert by_name(response.outputs)["labels"].shape == (1, 1)


async def test_the_earlier_of_deadline_and_timeout_wins(core: DataPlane) -> None:
    with pytest.raises(DeadlineExceededError):
        await core.infer(
            request(
                "convnet",
                tensor("input", FP32_28),
                deadline=time.monotonic() + 60,
                parameters={"timeout": 1},
            )
        )


# --- health, metadata, draining ---


async def test_health_and_readiness(core: DataPlane) -> None:
    assert core.server_live()
    assert await core.server_ready()
    assert await core.model_ready("convnet")
    assert await core.model_ready("fcn", "1")
    with pytest.raises(UnknownModelError, match="unknown model 'resnet'"):
        await core.model_ready("resnet")
    with pytest.raises(UnknownModelError, match="no version '7'"):
        await core.model_ready("fcn", "7")


async def test_metadata_describes_inputs_and_outputs_truthfully(core: DataPlane) -> None:
    assert core.model_names() == ["convnet", "fcn"]
    convnet = core.model_metadata("convnet")
    assert convnet.versions == ("1",)
    assert convnet.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, t.shape) for t in convnet.inputs] == [
        ("input", "FP32", (-1, 3, 28, 28)),
        ("pixels", "UINT8", (-1, 3, 28, 28)),
        ("image", "BYTES", (-1, 1)),
    ]
    assert [(t.name, t.datatype, t.shape) for t in convnet.outputs] == [
        ("logits", "FP32", (-1, 10)),
        ("probabilities", "FP32", (-1, 10)),
        ("labels", "BYTES", (-1, -1)),
        ("conv1", "FP32", (-1, 32, 28, 28)),
        ("pool1", "FP32", (-1, 32, 14, 14)),
        ("conv2", "FP32", (-1, 64, 14, 14)),
        ("pool2", "FP32", (-1, 64, 7, 7)),
        ("fc1", "FP32", (-1, 512)),
    ]
    fcn = core.model_metadata("fcn", "1")
    assert [(t.name, t.datatype, t.shape) for t in fcn.inputs] == [
        ("input", "FP32", (-1, 3, -1, -1)),
        ("pixels", "UINT8", (-1, 3, -1, -1)),
        ("image", "BYTES", (-1, 1)),
    ]
    assert [(t.name, t.datatype, t.shape) for t in fcn.outputs] == [
        ("scores", "FP32", (-1, 4, -1, -1)),
        ("mask", "UINT8", (-1, -1, -1)),
        ("counts", "INT64", (-1, 4)),
        ("conv1", "FP32", (-1, 32, -1, -1)),
        ("conv2", "FP32", (-1, 64, -1, -1)),
        ("conv3", "FP32", (-1, 128, -1, -1)),
        ("unsample1", "FP32", (-1, 64, -1, -1)),
        ("unsample2", "FP32", (-1, 32, -1, -1)),
    ]
    server = core.server_metadata()
    assert server.name == "cnnserve"
    assert server.version
    assert "classification" in server.extensions


async def test_every_output_matches_its_metadata(core: DataPlane) -> None:
    for model, x in (("convnet", FP32_28), ("fcn", np.zeros((2, 3, 9, 11), np.float32))):
        meta = core.model_metadata(model)
        wanted = [RequestedOutput(t.name) for t in meta.outputs]
        response = await core.infer(request(model, tensor("input", x), outputs=wanted))
        for described, produced in zip(meta.outputs, response.outputs, strict=True):
            assert produced.name == described.name
            assert produced.datatype == described.datatype
            assert len(produced.shape) == len(described.shape)
            assert all(d in (-1, p) for d, p in zip(described.shape, produced.shape, strict=True))
            assert produced.data.shape == produced.shape


async def test_drain_refuses_new_requests_and_finishes_in_flight(model_repository: Path) -> None:
    core = await create_core(settings_for(model_repository, max_batch_delay_ms=200))
    await core.start()
    convnet = core.models.version("convnet")
    in_flight = asyncio.create_task(core.infer(request("convnet", tensor("input", FP32_28))))
    await asyncio.sleep(0.01)  # let it reach the batcher's queue
    core.begin_drain()
    assert not await core.server_ready()
    assert not await core.model_ready("convnet")
    with pytest.raises(UnavailableError, match="not accepting requests"):
        await core.infer(request("convnet", tensor("input", FP32_28)))
    await core.stop(grace_s=30)
    response = await in_flight
    assert by_name(response.outputs)["labels"].shape == (1, 1)
    assert not await core.backend.ready(convnet)


async def test_infer_before_start_is_unavailable(model_repository: Path) -> None:
    core = await create_core(settings_for(model_repository))
    with pytest.raises(UnavailableError):
        await core.infer(request("convnet", tensor("input", FP32_28)))
    assert not await core.server_ready()


async def test_read_only_input_buffers_are_served(core: DataPlane) -> None:
    # Transports decode raw tensor contents with np.frombuffer, which is read-only.
    pixels, labels = digit_pixels(30, 31)
    x = normalize(pixels)
    read_only = np.frombuffer(x.tobytes(), dtype=np.float32).reshape(x.shape)
    assert not read_only.flags.writeable
    wanted = [RequestedOutput("logits")]
    frozen = await core.infer(request("convnet", tensor("input", read_only), outputs=wanted))
    plain = await core.infer(request("convnet", tensor("input", x), outputs=wanted))
    np.testing.assert_array_equal(frozen.outputs[0].data, plain.outputs[0].data)
    assert frozen.outputs[0].data.argmax(axis=1).tolist() == labels


@pytest.mark.torchserve
async def test_core_over_torchserve_classifies_and_segments(
    torchserve: RunningTorchServe, model_repository: Path
) -> None:
    settings = torchserve.gateway_settings(model_repository, max_batch_delay_ms=20)
    core = await create_core(settings)
    await core.start()
    try:
        assert await core.server_ready()
        assert core.model_metadata("convnet").platform == "torchserve"
        pngs = [digit_png(i) for i in range(3)]
        responses = await asyncio.gather(
            *(core.infer(request("convnet", images(png))) for png, _ in pngs)
        )
        got = [by_name(r.outputs)["labels"].data[0, 0].decode() for r in responses]
        assert got == [str(label) for _, label in pngs]
        png, truth = shapes_png(seed=3, side=64)
        response = await core.infer(request("fcn", images(png)))
        assert float((by_name(response.outputs)["mask"].data[0] == truth).mean()) > 0.8
    finally:
        await core.stop(grace_s=5)


def _sample(core: DataPlane, name: str, **labels: str) -> float:
    """One sample of the core's own metrics (0 when absent)."""
    for family in text_string_to_metric_families(core.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def test_a_full_queue_refuses_before_decoding(model_repository: Path) -> None:
    """Regression (overload): with the queue full, a request is refused
    OverloadedError at once — even one whose image is broken, which shows it was never
    decoded (decoding what will be refused spends the CPU an overloaded server lacks)."""
    settings = settings_for(
        model_repository, max_queue_size=2, max_batch_size=2, max_batch_delay_ms=0
    )
    started = await create_core(settings)
    await started.start()
    try:
        big = tensor("pixels", np.zeros((2, 3, 512, 512), np.uint8))
        running = asyncio.create_task(started.infer(InferRequest("fcn", [big])))
        await wait_until_async(
            lambda: _sample(started, "cnnserve_queue_seconds_count", model="fcn", version="1") >= 1,
            30.0,
            "the first fcn request to leave the queue",
            0.01,
        )
        queued = asyncio.create_task(started.infer(InferRequest("fcn", [big])))
        await wait_until_async(
            lambda: _sample(started, "cnnserve_queue_depth", model="fcn", version="1") >= 2,
            30.0,
            "the second fcn request to be queued",
            0.01,
        )
        with pytest.raises(
            OverloadedError, match="fcn version 1 is overloaded: 2 of 2 items queued"
        ):
            await started.infer(InferRequest("fcn", [images(b"not an image")]))
        for answered in await asyncio.gather(running, queued):
            assert answered.outputs[0].data.shape[0] == 2
    finally:
        await started.stop(grace_s=30)
