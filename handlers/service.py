"""The TorchServe handler core both models share: requests in, one inference, replies out.

TorchServe hands ``handle`` a list of requests (its own batch) and wants a list of the same
length back. Each request is one of three forms, told apart by its bytes:

- a **packed batch** (``.npy``, see :mod:`cnnserve.handlers.packing`) of already-normalized
  items, as the gateway sends tensor and pixel inputs: answered with the packed raw outputs
  for all its items;
- a **packed image batch** (:func:`~cnnserve.handlers.packing.pack_images`), as the gateway
  sends image inputs: each image decoded here, in the worker process, by
  :func:`~cnnserve.models.image_batch.decode_image_batch` (its header checked again against
  the size the gateway priced, and against this worker's ``max_image_pixels``), normalized and
  run; answered with the outputs for all its items plus each image that failed, by index, so
  that only the callers of those images fail;
- a **direct image** (PNG/JPEG body, e.g. ``curl -T digit.png .../predictions/convnet``):
  decoded and prepared by the shared model-side steps, answered with the friendly reply of
  :mod:`cnnserve.models.semantics` (the gateway's ``/predict`` gives the same bytes). Its
  options come from request headers and extra named inputs: TorchServe 0.12 passes headers on
  to handlers but drops query parameters.

Beside either packed form, a ``layers`` input (comma-separated feature map names,
:mod:`cnnserve.models.features`) asks for the maps too: the batch runs the archive's feature
artifact and is answered with packed rows of output and maps
(:func:`~cnnserve.models.features.pack_rows`).

A request that fails (undecodable image, wrong shape, bad option) gets its own 4xx status and
a JSON error body while the other requests in the same TorchServe batch are answered as usual.

Which model a worker serves comes from its archive, not from code: the name TorchServe
registered it under, and the version's ``config.yaml`` and ``export.json`` packed beside the
artifact (:mod:`cnnserve.torchserve_engine.archive`) give its classes, labels, normalization,
digit centring and input sizes — so one entry file (``model_handler.py``) serves any model of
a repository. All the model code lives in :mod:`cnnserve.models`; this module only adapts
TorchServe to it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from cnnserve.errors import CnnserveError, InvalidInputError, PayloadTooLargeError
from cnnserve.models.features import layer_elements
from cnnserve.models.image_batch import decode_image_batch
from cnnserve.models.imaging import DEFAULT_MAX_IMAGE_PIXELS
from cnnserve.models.repository import (
    CONFIG_FILE,
    EXPORT_FILE,
    exported_spec,
    read_config,
    read_export,
)
from cnnserve.models.runtime import ARTIFACT_SUFFIX, ArtifactFormat, Runner, load_runner
from cnnserve.models.semantics import (
    JSON_CONTENT_TYPE,
    ReplyOptions,
    parse_options,
    render_reply,
)
from cnnserve.models.spec import ModelSpec, Task
from cnnserve.models.steps import normalize
from cnnserve.protocol.status import http_status

from .packing import (
    LAYERS_INPUT_NAME,
    MAX_PACKED_BYTES,
    PACKED_CONTENT_TYPE,
    PACKED_INPUT_NAME,
    RESULTS_CONTENT_TYPE,
    ImageBatch,
    error_body,
    is_image_batch,
    is_packed,
    pack,
    pack_results,
    unpack,
    unpack_images,
)

logger = logging.getLogger(__name__)

#: Where a request's payload may sit: the gateway's packed batch, a gRPC ``data`` input, or
#: the raw REST body (TorchServe names it ``body``).
PAYLOAD_NAMES = (PACKED_INPUT_NAME, "data", "body")


class HandlerContext(Protocol):
    """The part of TorchServe's ``ts.context.Context`` a handler uses."""

    model_name: str
    manifest: dict[str, Any]
    model_yaml_config: dict[str, Any]

    @property
    def system_properties(self) -> dict[str, Any]:
        """``model_dir``, ``gpu_id`` (``None`` without a GPU), ``batch_size``, ..."""
        ...

    def get_all_request_header(self, idx: int) -> dict[str, Any]:
        """Headers of request ``idx`` (and per-input content types)."""
        ...

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        """HTTP status of the reply to request ``idx``."""
        ...

    def set_response_content_type(self, idx: int, value: str) -> None:
        """Content type of the reply to request ``idx``."""
        ...

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        """An extra header on the reply to request ``idx``."""
        ...


@dataclass
class _Job:
    """One TorchServe request, parsed: its items and how to answer it."""

    index: int
    #: Float32 ``N×3×H×W``; ``None`` when every image of an image batch failed.
    items: np.ndarray | None
    #: The friendly reply's options of a direct image; None for a packed batch.
    options: ReplyOptions | None
    #: An image batch's failed items by index (``None`` for the other forms).
    failures: dict[int, CnnserveError] | None = None
    #: The feature maps a packed batch asks for (none: the output alone).
    layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoadedModel:
    """The model a worker serves: its spec, its runner, and how the runner was chosen."""

    spec: ModelSpec
    runner: Runner
    artifact: Path
    artifact_format: ArtifactFormat
    half: bool
    #: Largest image (W×H) this worker decodes, checked from its header before decoding.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


class ModelHandler:
    """A TorchServe function-style handler for the model version its archive holds; see the
    module docstring. A worker process serves one model version, so one handler each."""

    def __init__(self) -> None:
        self.model: LoadedModel | None = None

    @property
    def spec(self) -> ModelSpec:
        """The served model's spec (known once the first call has loaded the model)."""
        if self.model is None:
            raise RuntimeError("the handler has not loaded its model yet")
        return self.model.spec

    def handle(
        self, data: list[dict[str, Any]] | None, context: HandlerContext
    ) -> list[Any] | None:
        """TorchServe's entry point: ``None`` initializes; a list of requests is answered."""
        if self.model is None:
            self.model = load_model(archived_spec(context), context)
        if data is None:
            return None
        replies: list[Any] = [None] * len(data)
        jobs: list[_Job] = []
        for index, request in enumerate(data):
            try:
                jobs.append(self._parse(index, request, context))
            except CnnserveError as exc:
                replies[index] = _fail(context, index, exc)
        for job in jobs:
            if job.items is None:  # every image failed: nothing to run
                replies[job.index] = self._reply(job, None, context)
        for group in _by_item_shape(jobs):
            self._run(group, context, replies)
        if len(replies) != len(data) or any(reply is None for reply in replies):
            raise RuntimeError(f"{self.spec.name}: {len(data)} requests but replies {replies!r}")
        return replies

    def _parse(self, index: int, request: Mapping[str, Any], context: HandlerContext) -> _Job:
        payload = _payload(request)
        if is_packed(payload):
            items = unpack(payload, ndim=4)
            self.spec.check_item_shape(items.shape[1:])
            return _Job(index, items, options=None, layers=self._layers(request))
        if is_image_batch(payload):
            return self._decode(index, unpack_images(payload), self._layers(request))
        # Options first: a bad one is refused before the image is decoded.
        options = parse_options(_options(request, context.get_all_request_header(index)))
        pixels = self.spec.image_to_pixels(payload)
        return _Job(index, normalize(pixels, self.spec.normalization)[np.newaxis], options)

    def _layers(self, request: Mapping[str, Any]) -> tuple[str, ...]:
        """The feature maps a packed request asks for, each one this version offers."""
        value = request.get(LAYERS_INPUT_NAME)
        if value is None:
            return ()
        if not isinstance(value, bytes | bytearray | str):
            raise InvalidInputError(f"input {LAYERS_INPUT_NAME!r} must be text")
        text = value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")
        layers = tuple(name for name in text.split(",") if name)
        offered = self.spec.feature_layers
        unknown = [name for name in layers if name not in offered]
        if unknown or len(set(layers)) != len(layers):
            raise InvalidInputError(
                f"{self.spec.name} offers the feature maps {', '.join(offered) or 'none'}; "
                f"asked for {text[:200]!r}"
            )
        return layers

    def _decode(self, index: int, batch: ImageBatch, layers: tuple[str, ...]) -> _Job:
        """Decode and normalize an image batch, each image that fails kept to its index."""
        assert self.model is not None
        check_image_batch_cost(self.spec, batch, layers)
        decoded = decode_image_batch(
            self.spec, batch.images, self.model.max_image_pixels, batch.declared_size
        )
        failures: dict[int, CnnserveError] = dict(decoded.failures)
        if len(failures) == len(batch.images):
            return _Job(index, None, options=None, failures=failures, layers=layers)
        # Failed items run as zeros (placeholder rows): one forward pass of the batch's shape.
        items = normalize(decoded.pixels, self.spec.normalization)
        return _Job(index, items, options=None, failures=failures, layers=layers)

    def _run(self, jobs: list[_Job], context: HandlerContext, replies: list[Any]) -> None:
        assert self.model is not None
        items = [job.items for job in jobs if job.items is not None]
        layers = jobs[0].layers
        runner = self.model.runner
        try:
            batch = np.concatenate(items)
            outputs = runner.infer_features(batch, layers) if layers else runner.infer(batch)
        except CnnserveError as exc:
            # A version archived without its feature artifact, say: the callers are told why.
            for job in jobs:
                replies[job.index] = _fail(context, job.index, exc)
            return
        except Exception:
            # One failed batch must not take the worker down; its callers get a 500.
            logger.exception("%s: inference failed", self.spec.name)
            for job in jobs:
                replies[job.index] = _fail(context, job.index, RuntimeError("inference failed"))
            return
        offsets = np.cumsum([len(batch) for batch in items])[:-1]
        for job, output in zip(jobs, np.split(outputs, offsets), strict=True):
            try:
                replies[job.index] = self._reply(job, output, context)
            except CnnserveError as exc:
                replies[job.index] = _fail(context, job.index, exc)

    def _reply(self, job: _Job, output: np.ndarray | None, context: HandlerContext) -> bytes:
        if job.failures:
            context.set_response_content_type(job.index, RESULTS_CONTENT_TYPE)
            # Without outputs every item failed, so the failures count the batch.
            count = len(job.failures) if output is None else len(output)
            return pack_results(output, job.failures, count)
        if job.options is None:
            assert output is not None
            context.set_response_content_type(job.index, PACKED_CONTENT_TYPE)
            return pack(output, ndim=None)
        assert output is not None
        reply = render_reply(self.spec, output, job.options)
        context.set_response_content_type(job.index, reply.content_type)
        for key, value in reply.headers.items():
            context.set_response_header(job.index, key, value)
        return reply.body


def load_model(spec: ModelSpec, context: HandlerContext) -> LoadedModel:
    """Open the artifact packed into the archive on the GPU TorchServe assigned, else the CPU.

    The archive's ``model-config.yaml`` may ask for fp16 (``handler: {half: true}``); that
    only applies on a GPU, so a CPU worker warns and runs fp32 instead of failing to load.
    ``handler: {threads: n}`` bounds the threads one batch uses on a CPU (0: the library's
    default); the worker process serves one model, so torch's process-wide count is its own.
    ``handler: {max_image_pixels: n}`` is the largest image (W×H) an image batch may make it
    decode (default :data:`~cnnserve.models.imaging.DEFAULT_MAX_IMAGE_PIXELS`, the gateway's
    default too).
    """
    model_dir = Path(context.system_properties["model_dir"])
    artifact = model_dir / context.manifest["model"]["serializedFile"]
    artifact_format = artifact_format_of(artifact)
    gpu_id = context.system_properties.get("gpu_id")
    device = f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu"
    options = (context.model_yaml_config or {}).get("handler") or {}
    half = bool(options.get("half", False))
    if half and device == "cpu":
        logger.warning("%s: half precision needs a GPU; running fp32 on the CPU", spec.name)
        half = False
    threads = int(options.get("threads", 0))
    max_image_pixels = int(options.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
    if threads > 0:
        torch.set_num_threads(threads)
    runner = load_runner(
        artifact, artifact_format, device, half, threads=threads, normalization=spec.normalization
    )
    logger.info(
        "%s: serving %s (%s%s) on %s",
        spec.name,
        artifact.name,
        artifact_format,
        ", fp16" if half else "",
        runner.device,
    )
    return LoadedModel(spec, runner, artifact, artifact_format, half, max_image_pixels)


def check_image_batch_cost(spec: ModelSpec, batch: ImageBatch, layers: Sequence[str] = ()) -> None:
    """Refuse an image batch before any image is decoded when its network input or output
    (with the feature maps ``layers`` asks for) would be over
    :data:`~.packing.MAX_PACKED_BYTES` (the cap a float32 batch has on its input), or when a
    size-variable model's batch declares no size, or one it cannot take.

    A fixed-size model's items cost its input size whatever the images' own; a size-variable
    model's items are the declared size, which every image's header is held to while it is
    decoded.
    """
    if spec.fixed_size is not None:
        height, width = spec.fixed_size
    elif batch.declared_size is None:
        raise InvalidInputError(
            f"{spec.name} takes images of any size, so an image batch for it must declare "
            "the size its images share"
        )
    else:
        width, height = batch.declared_size
        spec.check_size(height, width)
    item_input = 3 * height * width
    item_output = spec.num_classes * (height * width if spec.task is Task.SEGMENTATION else 1)
    item_output += layer_elements(spec, layers, height, width)
    nbytes = len(batch.images) * max(item_input, item_output) * np.dtype(np.float32).itemsize
    if nbytes > MAX_PACKED_BYTES:
        raise PayloadTooLargeError(
            f"{len(batch.images)} images of {width}×{height} need {nbytes} bytes of network "
            f"input or output; the limit is {MAX_PACKED_BYTES} bytes"
        )


def archived_spec(context: HandlerContext) -> ModelSpec:
    """The spec of the model version unpacked in the worker's model directory.

    Built as the repository builds it (:func:`~cnnserve.models.repository.exported_spec`) from
    the version's ``config.yaml`` and ``export.json``, under the name TorchServe registered it
    with (the name callers address). Raises :class:`~cnnserve.models.repository.RepositoryError`
    naming the file and field at fault; TorchServe then fails the worker's load, and the
    registration with it.
    """
    model_dir = Path(context.system_properties["model_dir"])
    config = read_config(model_dir / CONFIG_FILE)
    export = read_export(model_dir / EXPORT_FILE)
    return exported_spec(context.model_name, config, export, model_dir)


def artifact_format_of(path: Path) -> ArtifactFormat:
    """``torchscript`` for ``.pt``, ``onnx`` for ``.onnx``; anything else is an error."""
    for artifact_format, suffix in ARTIFACT_SUFFIX.items():
        if path.suffix == suffix:
            return artifact_format
    raise ValueError(f"{path.name}: not an exported artifact (.pt or .onnx)")


def _payload(request: Mapping[str, Any]) -> bytes:
    for name in PAYLOAD_NAMES:
        if name in request:
            value = request[name]
            if isinstance(value, bytes | bytearray | memoryview):
                return bytes(value)
            raise InvalidInputError(
                f"input {name!r} must be binary (an image or a packed batch), "
                f"got {type(value).__name__}; send it as application/octet-stream"
            )
    raise InvalidInputError(
        f"request carries no input; send an image body or a packed batch named "
        f"{PACKED_INPUT_NAME!r} (got inputs {sorted(request)})"
    )


def _options(request: Mapping[str, Any], headers: Mapping[str, Any]) -> dict[str, str]:
    """Request headers and extra named inputs as one lower-cased, string-valued mapping."""
    options: dict[str, str] = {}
    for source in (headers, request):
        for name, value in source.items():
            if name in PAYLOAD_NAMES:
                continue
            if isinstance(value, bytes | bytearray):
                options[name.lower()] = bytes(value).decode("utf-8", "replace")
            elif isinstance(value, str):
                options[name.lower()] = value
    return options


def _by_item_shape(jobs: Sequence[_Job]) -> list[list[_Job]]:
    """Group requests whose items can share one forward pass (same ``3×H×W`` and feature
    maps asked for); requests with nothing to run are left out."""
    groups: dict[tuple[object, ...], list[_Job]] = {}
    for job in jobs:
        if job.items is not None:
            groups.setdefault((*job.items.shape[1:], job.layers), []).append(job)
    return list(groups.values())


def _fail(context: HandlerContext, index: int, exc: BaseException) -> bytes:
    """Mark request ``index`` failed with the error table's status; return its JSON body."""
    code = http_status(exc)
    # The reason phrase stays the standard one: messages may hold non-ASCII (×, ≤), which an
    # HTTP status line cannot carry; the body has the full message.
    context.set_response_status(code, HTTPStatus(code).phrase, index)
    context.set_response_content_type(index, JSON_CONTENT_TYPE)
    return error_body(exc)
