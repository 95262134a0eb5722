"""The outputs a model offers, computed from the network's raw output only when requested.

ConvNet (raw output: logits ``N×C``):

- ``logits``        FP32  ``[N,C]``
- ``probabilities`` FP32  ``[N,C]`` (softmax)
- ``labels``        BYTES ``[N,k]`` — the k most probable labels, best first; k from the
  output's ``top_k`` parameter (or Triton's ``classification``), default 1.

FCN (raw output: scores ``N×C×H×W``):

- ``scores`` FP32  ``[N,C,H,W]``
- ``mask``   UINT8 ``[N,H,W]`` (argmax class per pixel, ~40× smaller than the scores)
- ``counts`` INT64 ``[N,C]`` (pixels per class)

Both, when the version's artifacts offer them (exported with its feature artifacts), the
networks' feature maps: FP32, named after the tutorial's layers (ConvNet ``conv1``, ``pool1``,
``conv2``, ``pool2`` ``[N,C,H,W]`` and ``fc1`` ``[N,512]``; FCN ``conv1``, ``conv2``, ``conv3``,
``unsample1``, ``unsample2`` ``[N,C,H,W]``; :mod:`cnnserve.models.features`). They are
computed only for a request that names one (:func:`requested_layers`), which runs the feature
artifact; every other request runs the plain one.

Defaults when a request names none: ``labels`` + ``probabilities``; ``mask`` + ``counts``.

Triton's classification extension: ``classification = k`` on ``logits`` or ``probabilities``
turns that output into BYTES ``[N,k]`` strings ``"value:index:label"``, as Triton does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cnnserve.errors import InvalidInputError
from cnnserve.models.features import FEATURE_LAYERS, feature_metadata
from cnnserve.models.semantics import pixel_counts, ranked
from cnnserve.models.spec import ModelSpec, Task
from cnnserve.models.steps import class_mask, softmax
from cnnserve.protocol.domain import ParameterValue, RequestedOutput, Tensor, TensorMetadata

TOP_K = "top_k"
CLASSIFICATION = "classification"


class _Raw:
    """One request's raw network output, with the derived arrays computed at most once."""

    def __init__(self, spec: ModelSpec, raw: np.ndarray, maps: dict[str, np.ndarray]) -> None:
        self.spec = spec
        self.raw = raw
        #: The feature maps the request asked for, by name.
        self.maps = maps

    @functools.cached_property
    def probabilities(self) -> np.ndarray:
        """Softmax over the classes of a classifier's logits."""
        return softmax(self.raw)

    @functools.cached_property
    def mask(self) -> np.ndarray:
        """Argmax class per pixel of a segmenter's scores (``mask`` and ``counts`` share it)."""
        return class_mask(self.raw)


@dataclass(frozen=True)
class _Output:
    """One output: metadata, how to compute it, and which top-k parameters it takes."""

    name: str
    datatype: str
    #: ``(num_classes) → shape`` with -1 for variable dims.
    shape: Callable[[int], tuple[int, ...]]
    compute: Callable[[_Raw, int | None], np.ndarray]
    #: Parameters that set k on this output.
    k_parameters: tuple[str, ...] = ()


def _classified(values: np.ndarray, labels: tuple[str, ...], k: int) -> np.ndarray:
    """Triton's classification strings ``value:index:label`` for the k largest values."""
    rows = [
        [f"{values[n, i]:f}:{i}:{labels[i]}".encode() for i in row]
        for n, row in enumerate(ranked(values, k))
    ]
    return np.array(rows, dtype=object)


def _logits(out: _Raw, k: int | None) -> np.ndarray:
    return out.raw if k is None else _classified(out.raw, out.spec.labels, k)


def _probabilities(out: _Raw, k: int | None) -> np.ndarray:
    return out.probabilities if k is None else _classified(out.probabilities, out.spec.labels, k)


@functools.cache
def _label_bytes(labels: tuple[str, ...]) -> np.ndarray:
    """The labels as a BYTES array, so a whole batch's top-k is one fancy index."""
    encoded = np.empty(len(labels), dtype=object)
    encoded[:] = [label.encode() for label in labels]
    return encoded


def _labels(out: _Raw, k: int | None) -> np.ndarray:
    # The friendly top-k's ranking, without a Python loop per row.
    labels: np.ndarray = _label_bytes(out.spec.labels)[ranked(out.probabilities, k or 1)]
    return labels


def _counts(out: _Raw, _k: int | None) -> np.ndarray:
    return pixel_counts(out.mask, out.spec.num_classes)


_CLASSIFIER = (
    _Output("logits", "FP32", lambda c: (-1, c), _logits, (CLASSIFICATION,)),
    _Output("probabilities", "FP32", lambda c: (-1, c), _probabilities, (CLASSIFICATION,)),
    _Output("labels", "BYTES", lambda c: (-1, -1), _labels, (TOP_K, CLASSIFICATION)),
)
_SEGMENTER = (
    _Output("scores", "FP32", lambda c: (-1, c, -1, -1), lambda out, _k: out.raw),
    _Output("mask", "UINT8", lambda c: (-1, -1, -1), lambda out, _k: out.mask),
    _Output("counts", "INT64", lambda c: (-1, c), _counts),
)
_FAMILIES = {Task.CLASSIFICATION: _CLASSIFIER, Task.SEGMENTATION: _SEGMENTER}
_DEFAULTS = {
    Task.CLASSIFICATION: ("labels", "probabilities"),
    Task.SEGMENTATION: ("mask", "counts"),
}


#: Each task's outputs by name, built once (every request looks its outputs up).
_BY_NAME = {task: {o.name: o for o in family} for task, family in _FAMILIES.items()}


def _feature_map(name: str, shape: tuple[int, ...]) -> _Output:
    """A feature map as an output: FP32, its metadata shape whatever the class count."""
    return _Output(name, "FP32", lambda _c: shape, lambda out, _k: out.maps[name])


#: The outputs of each kind of spec that offers feature maps, built once per kind.
_WITH_FEATURES: dict[tuple[object, ...], dict[str, _Output]] = {}


def _outputs(spec: ModelSpec) -> dict[str, _Output]:
    if not spec.feature_layers:
        return _BY_NAME[spec.task]
    kind = (spec.architecture, spec.feature_layers, spec.fixed_size)
    outputs = _WITH_FEATURES.get(kind)
    if outputs is None:
        outputs = dict(_BY_NAME[spec.task])
        offered = feature_metadata(spec.architecture, spec.feature_layers, spec.fixed_size)
        outputs.update({name: _feature_map(name, shape) for name, shape in offered})
        _WITH_FEATURES[kind] = outputs
    return outputs


def output_metadata(spec: ModelSpec) -> tuple[TensorMetadata, ...]:
    """Every output ``spec`` offers, with ``-1`` for variable dimensions."""
    return tuple(
        TensorMetadata(o.name, o.datatype, o.shape(spec.num_classes))
        for o in _outputs(spec).values()
    )


def default_outputs(spec: ModelSpec) -> tuple[str, ...]:
    """The outputs sent when a request names none."""
    return _DEFAULTS[spec.task]


@dataclass(frozen=True)
class OutputPlan:
    """A validated output request: which output, and k when a top-k parameter set it."""

    name: str
    k: int | None


def _k(parameters: dict[str, ParameterValue], accepted: tuple[str, ...], output: str) -> int | None:
    k: int | None = None
    for key in (TOP_K, CLASSIFICATION):
        if key not in parameters:
            continue
        value = parameters[key]
        if key not in accepted:
            raise InvalidInputError(f"output {output!r} does not take parameter {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(
                f"parameter {key!r} of output {output!r} must be an integer ≥ 1, got {value!r}"
            )
        k = value
    return k


def plan_outputs(spec: ModelSpec, requested: list[RequestedOutput] | None) -> list[OutputPlan]:
    """Check the requested outputs (names, parameters) before any compute; apply defaults."""
    offered = _outputs(spec)
    if not requested:
        return [OutputPlan(name, None) for name in default_outputs(spec)]
    plans: list[OutputPlan] = []
    for out in requested:
        spec_out = offered.get(out.name)
        if spec_out is None:
            raise InvalidInputError(
                f"unknown output {out.name!r} for {spec.name}; valid outputs: {', '.join(offered)}"
            )
        if any(p.name == out.name for p in plans):
            raise InvalidInputError(f"output {out.name!r} is requested more than once")
        plans.append(OutputPlan(out.name, _k(out.parameters, spec_out.k_parameters, out.name)))
    return plans


def requested_layers(spec: ModelSpec, plans: list[OutputPlan]) -> tuple[str, ...]:
    """The feature maps ``plans`` ask for, in the network's order (so that requests asking
    for the same maps share batches whatever order they named them in)."""
    named = {plan.name for plan in plans}
    return tuple(layer for layer in FEATURE_LAYERS[spec.architecture] if layer in named)


def compute_outputs(
    spec: ModelSpec,
    raw: np.ndarray,
    plans: list[OutputPlan],
    maps: dict[str, np.ndarray] | None = None,
) -> list[Tensor]:
    """The requested output tensors from the network's raw output for one request, and the
    feature maps it asked for (``maps``, by name)."""
    offered = _outputs(spec)
    source = _Raw(spec, raw, maps or {})
    tensors: list[Tensor] = []
    for plan in plans:
        out = offered[plan.name]
        data = out.compute(source, plan.k)
        datatype = "BYTES" if data.dtype == object else out.datatype
        tensors.append(Tensor(plan.name, datatype, tuple(data.shape), data))
    return tensors
