"""Triton's model configuration, statistics and model repository extensions, on both wires.

Triton answers these calls from protobuf messages over gRPC and renders the same messages as
JSON over REST (proto field names, every field including defaults, enums by name, 64-bit
integers as JSON numbers). cnnserve does the same: each answer is built once as a message
(:func:`model_config_to_proto`, :func:`statistics_to_proto`, :func:`index_to_proto`) and
:func:`message_json` renders it for REST, so the two wires cannot disagree. The repository
index is the exception, as in Triton: its REST answer is a bare list whose ``version`` and
``reason`` are left out when empty (:func:`index_to_json`).

Requests: the REST bodies of index, load and unload (all optional) and the gRPC parameter
maps decode to plain values here; which parameters a call accepts is the gateway's to say.
Nothing here imports grpc.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from cnnserve.protocol import model_config_pb2 as mc
from cnnserve.protocol import open_inference_pb2 as pb

from .domain import (
    DATATYPES,
    ConfigTensor,
    DurationStat,
    IndexEntry,
    ModelConfiguration,
    ParameterValue,
    VersionStats,
)
from .errors import CodecError
from .json_text import load_json, shown

#: A parameter of a load or unload request (gRPC's ``bytes_param`` arrives as bytes).
RepositoryParameter = ParameterValue | bytes

#: OIP datatype → Triton's ``DataType`` (BYTES is TYPE_STRING there).
_DATA_TYPES = {name: f"TYPE_{'STRING' if name == 'BYTES' else name}" for name in DATATYPES}
_FORMATS = {"": mc.ModelInput.FORMAT_NONE, "NCHW": mc.ModelInput.FORMAT_NCHW}
_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


# --- rendering a message as Triton's REST API does ---


def message_json(message: Message) -> dict[str, Any]:
    """``message`` as Triton's REST API renders it: proto field names in field order, every
    field (defaults too), enums by name, 64-bit integers as numbers, not protobuf's strings."""
    rendered = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    # The runtime's descriptor type differs from the pure-Python one only in its stubs.
    return _numbers(rendered, cast(Descriptor, message.DESCRIPTOR))


def _numbers(rendered: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    return {
        field.name: _field(rendered[field.name], field)
        for field in descriptor.fields
        if field.name in rendered
    }


def _field(value: Any, field: FieldDescriptor) -> Any:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        value_field = entry.fields_by_name["value"]
        return {key: _single(item, value_field) for key, item in value.items()}
    if field.is_repeated:
        return [_single(item, field) for item in value]
    return _single(value, field)


def _single(value: Any, field: FieldDescriptor) -> Any:
    if field.type in _INT64_TYPES:
        return int(value)
    if field.message_type is not None:
        return _numbers(value, field.message_type)
    return value


# --- model configuration ---


def _config_input(tensor: ConfigTensor) -> mc.ModelInput:
    return mc.ModelInput(
        name=tensor.name,
        data_type=_DATA_TYPES[tensor.datatype],
        format=_FORMATS[tensor.image_format],
        dims=tensor.dims,
        optional=tensor.optional,
    )


def _version_policy(config: ModelConfiguration) -> mc.ModelVersionPolicy:
    policy = config.version_policy
    if policy.kind == "all":
        return mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())
    if policy.kind == "specific":
        return mc.ModelVersionPolicy(
            specific=mc.ModelVersionPolicy.Specific(versions=policy.versions)
        )
    return mc.ModelVersionPolicy(
        latest=mc.ModelVersionPolicy.Latest(num_versions=policy.num_versions)
    )


def model_config_to_proto(config: ModelConfiguration) -> mc.ModelConfig:
    """:class:`ModelConfiguration` → Triton's ``ModelConfig`` message."""
    return mc.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend=config.backend,
        version_policy=_version_policy(config),
        max_batch_size=config.max_batch_size,
        input=[_config_input(t) for t in config.inputs],
        output=[
            mc.ModelOutput(name=t.name, data_type=_DATA_TYPES[t.datatype], dims=t.dims)
            for t in config.outputs
        ],
        dynamic_batching=mc.ModelDynamicBatching(
            max_queue_delay_microseconds=config.max_queue_delay_us,
            default_queue_policy=mc.ModelQueuePolicy(
                timeout_action=mc.ModelQueuePolicy.REJECT,
                default_timeout_microseconds=config.default_timeout_us,
                # A request's own timeout (or gRPC deadline) is used when it sets one.
                allow_timeout_override=True,
                max_queue_size=config.max_queue_size,
            ),
        ),
    )


def model_config_to_json(config: ModelConfiguration) -> dict[str, Any]:
    """``GET /v2/models/{m}/config``: the model configuration as Triton renders it."""
    return message_json(model_config_to_proto(config))


# --- statistics ---


def _duration(stat: DurationStat) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=stat.count, ns=stat.ns)


def _model_statistics(stats: VersionStats) -> pb.ModelStatistics:
    # Every duration is set, zero or not: perf_analyzer reads each one from Triton's JSON
    # without checking that it is there, so an empty one must still be rendered.
    return pb.ModelStatistics(
        name=stats.name,
        version=stats.version,
        last_inference=stats.last_inference,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
            # No response cache: nothing is ever a hit or a miss.
            cache_hit=pb.StatisticDuration(),
            cache_miss=pb.StatisticDuration(),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=batch.batch_size,
                compute_input=_duration(batch.compute_input),
                compute_infer=_duration(batch.compute_infer),
                compute_output=_duration(batch.compute_output),
            )
            for batch in stats.batch_stats
        ],
    )


def statistics_to_proto(stats: Iterable[VersionStats]) -> pb.ModelStatisticsResponse:
    """Statistics of model versions → ``ModelStatisticsResponse``."""
    return pb.ModelStatisticsResponse(model_stats=[_model_statistics(s) for s in stats])


def statistics_to_json(stats: Iterable[VersionStats]) -> dict[str, Any]:
    """``GET /v2/models[/{m}[/versions/{v}]]/stats``: ``{"model_stats": [...]}``."""
    return message_json(statistics_to_proto(stats))


# --- repository index, load and unload ---


def index_to_proto(entries: Iterable[IndexEntry]) -> pb.RepositoryIndexResponse:
    """Repository index rows → ``RepositoryIndexResponse``."""
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(
                name=e.name, version=e.version, state=str(e.state), reason=e.reason
            )
            for e in entries
        ]
    )


def index_to_json(entries: Iterable[IndexEntry]) -> list[dict[str, str]]:
    """``POST /v2/repository/index``: ``[{"name", "version", "state", "reason"}]``, without
    ``version`` for a model that has none and without an empty ``reason``, as Triton."""
    rows: list[dict[str, str]] = []
    for entry in entries:
        row = {"name": entry.name}
        if entry.version:
            row["version"] = entry.version
        row["state"] = str(entry.state)
        if entry.reason:
            row["reason"] = entry.reason
        rows.append(row)
    return rows


def _json_body(body: bytes, what: str) -> dict[str, Any]:
    """An optional JSON object body: no bytes at all is ``{}``; anything else must be a JSON
    object (whitespace alone is not JSON, as the OpenAPI description says)."""
    if not body:
        return {}
    document = load_json(body, f"{what} body")
    if not isinstance(document, dict):
        raise CodecError(f"{what} body must be a JSON object, got {shown(document)}")
    return document


def index_request_from_json(body: bytes) -> bool:
    """``$repository_index_request`` → whether only ready versions are asked for."""
    ready = _json_body(body, "repository index").get("ready", False)
    if not isinstance(ready, bool):
        raise CodecError(f"'ready' must be true or false, got {shown(ready)}")
    return ready


def repository_request_from_json(body: bytes, what: str) -> dict[str, RepositoryParameter]:
    """A load or unload body (``{"parameters": {...}}``, optional) → its parameters."""
    parameters = _json_body(body, what).get("parameters", {})
    if not isinstance(parameters, dict):
        raise CodecError(f"{what} parameters must be an object, got {shown(parameters)}")
    for key, value in parameters.items():
        if not isinstance(value, bool | int | float | str):
            kind = type(value).__name__
            raise CodecError(f"{what} parameter {key!r} must be a scalar, got {kind}")
    return dict(parameters)


def repository_parameters_from_proto(
    parameters: Mapping[str, pb.ModelRepositoryParameter],
) -> dict[str, RepositoryParameter]:
    """A load or unload request's parameter map → plain values (an unset choice is skipped)."""
    values: dict[str, RepositoryParameter] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(parameter, choice)
    return values
