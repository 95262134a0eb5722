"""Triton's configuration, statistics and repository messages, and their REST renderings.

The REST answers must be what Triton's REST API renders from the same messages (proto field
names, defaults printed, enums by name, 64-bit integers as exact JSON numbers), because
tritonclient and perf_analyzer read them as they read Triton's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
from google.protobuf import json_format

from cnnserve.protocol import model_config_pb2 as mc
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol.domain import ConfigTensor, ModelConfiguration, VersionChoice
from cnnserve.protocol.errors import CodecError
from cnnserve.protocol.triton_codec import (
    index_request_from_json,
    index_to_json,
    index_to_proto,
    message_json,
    model_config_to_json,
    model_config_to_proto,
    repository_parameters_from_proto,
    repository_request_from_json,
    statistics_to_json,
    statistics_to_proto,
)

CONVNET = ModelConfiguration(
    name="convnet",
    platform="onnxruntime_onnx",
    backend="onnxruntime",
    version_policy=VersionChoice("latest", num_versions=2),
    max_batch_size=32,
    inputs=(
        ConfigTensor("input", "FP32", (3, 28, 28), "NCHW", optional=True),
        ConfigTensor("image", "BYTES", (1,), optional=True),
    ),
    outputs=(ConfigTensor("logits", "FP32", (10,)), ConfigTensor("labels", "BYTES", (-1,))),
    max_queue_delay_us=2000,
    max_queue_size=512,
    default_timeout_us=0,
)


@dataclass(frozen=True)
class Duration:
    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class Batch:
    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True)
class Stats:
    name: str
    version: str
    last_inference: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batch_stats: tuple[Batch, ...]


@dataclass(frozen=True)
class Row:
    name: str
    version: str
    state: str
    reason: str


def test_model_config_json_is_tritons_rendering() -> None:
    assert model_config_to_json(CONVNET) == {
        "name": "convnet",
        "platform": "onnxruntime_onnx",
        "version_policy": {"latest": {"num_versions": 2}},
        "max_batch_size": 32,
        "input": [
            {
                "name": "input",
                "data_type": "TYPE_FP32",
                "format": "FORMAT_NCHW",
                "dims": [3, 28, 28],
                "optional": True,
            },
            {
                "name": "image",
                "data_type": "TYPE_STRING",
                "format": "FORMAT_NONE",
                "dims": [1],
                "optional": True,
            },
        ],
        "output": [
            {"name": "logits", "data_type": "TYPE_FP32", "dims": [10]},
            {"name": "labels", "data_type": "TYPE_STRING", "dims": [-1]},
        ],
        "dynamic_batching": {
            "max_queue_delay_microseconds": 2000,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": 0,
                "allow_timeout_override": True,
                "max_queue_size": 512,
            },
        },
        "backend": "onnxruntime",
    }


def test_model_config_json_parses_back_into_the_same_message() -> None:
    parsed = json_format.ParseDict(model_config_to_json(CONVNET), mc.ModelConfig())
    assert parsed == model_config_to_proto(CONVNET)


@pytest.mark.parametrize(
    ("choice", "rendered"),
    [
        (VersionChoice("latest"), {"latest": {"num_versions": 1}}),
        (VersionChoice("all"), {"all": {}}),
        (VersionChoice("specific", versions=(1, 3)), {"specific": {"versions": [1, 3]}}),
    ],
)
def test_version_policy(choice: VersionChoice, rendered: dict[str, object]) -> None:
    config = replace(CONVNET, version_policy=choice)
    assert model_config_to_json(config)["version_policy"] == rendered
    assert model_config_to_proto(config).version_policy.WhichOneof("policy_choice") == choice.kind


def test_every_datatype_has_a_triton_type() -> None:
    names = ["BOOL", "UINT8", "INT64", "FP16", "FP64", "BYTES"]
    config = replace(CONVNET, outputs=tuple(ConfigTensor(n, n, (1,)) for n in names))
    types = [mc.DataType.Name(o.data_type) for o in model_config_to_proto(config).output]
    assert types == [f"TYPE_{n}" for n in names[:-1]] + ["TYPE_STRING"]


def _stats(ns: int) -> Stats:
    return Stats(
        name="fcn",
        version="2",
        last_inference=1_700_000_000_123,
        inference_count=5,
        execution_count=2,
        success=Duration(3, ns),
        fail=Duration(1, 40),
        queue=Duration(3, 30),
        compute_input=Duration(3, 20),
        compute_infer=Duration(3, 10),
        compute_output=Duration(),
        batch_stats=(
            Batch(1, Duration(1, 1), Duration(1, 2), Duration(1, 3)),
            Batch(4, Duration(1, 4), Duration(1, 5), Duration(1, 6)),
        ),
    )


def test_statistics_json_is_tritons_shape() -> None:
    # Past 2**53 a double loses precision: Triton writes exact integers, so must we.
    big = 2**63 + 7
    (model,) = statistics_to_json([_stats(big)])["model_stats"]
    assert model == {
        "name": "fcn",
        "version": "2",
        "last_inference": 1_700_000_000_123,
        "inference_count": 5,
        "execution_count": 2,
        "inference_stats": {
            "success": {"count": 3, "ns": big},
            "fail": {"count": 1, "ns": 40},
            "queue": {"count": 3, "ns": 30},
            "compute_input": {"count": 3, "ns": 20},
            "compute_infer": {"count": 3, "ns": 10},
            "compute_output": {"count": 0, "ns": 0},
            "cache_hit": {"count": 0, "ns": 0},
            "cache_miss": {"count": 0, "ns": 0},
        },
        "batch_stats": [
            {
                "batch_size": 1,
                "compute_input": {"count": 1, "ns": 1},
                "compute_infer": {"count": 1, "ns": 2},
                "compute_output": {"count": 1, "ns": 3},
            },
            {
                "batch_size": 4,
                "compute_input": {"count": 1, "ns": 4},
                "compute_infer": {"count": 1, "ns": 5},
                "compute_output": {"count": 1, "ns": 6},
            },
        ],
    }


def test_statistics_proto_and_empty_answer() -> None:
    message = statistics_to_proto([_stats(9)])
    assert message.model_stats[0].inference_stats.success.ns == 9
    assert message.model_stats[0].inference_stats.HasField("cache_miss")
    assert statistics_to_json([]) == {"model_stats": []}


def test_index_json_leaves_out_empty_version_and_reason() -> None:
    rows = [
        Row("broken", "", "UNAVAILABLE", "config.yaml: architecture: field required"),
        Row("convnet", "1", "READY", ""),
    ]
    assert index_to_json(rows) == [
        {
            "name": "broken",
            "state": "UNAVAILABLE",
            "reason": "config.yaml: architecture: field required",
        },
        {"name": "convnet", "version": "1", "state": "READY"},
    ]
    message = index_to_proto(rows)
    assert [(m.name, m.version, m.state, m.reason) for m in message.models] == [
        ("broken", "", "UNAVAILABLE", "config.yaml: architecture: field required"),
        ("convnet", "1", "READY", ""),
    ]


def test_message_json_renders_maps_and_repeated_64_bit_integers() -> None:
    request = pb.RepositoryModelLoadRequest(model_name="m")
    request.parameters["n"].int64_param = -(2**62)
    request.parameters["flag"].bool_param = True
    assert message_json(request) == {
        "repository_name": "",
        "model_name": "m",
        "parameters": {"n": {"int64_param": -(2**62)}, "flag": {"bool_param": True}},
    }


@pytest.mark.parametrize(
    ("body", "ready"),
    [(b"", False), (b"{}", False), (b' {"ready": true}\n', True)],
)
def test_index_request(body: bytes, ready: bool) -> None:
    assert index_request_from_json(body) is ready


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"ready": "yes"}', "'ready' must be true or false"),
        (b"[true]", "must be a JSON object"),
        (b"{", "not valid JSON"),
        (b"\xff", "not valid JSON"),
        # A body that is not JSON, even if only whitespace (schemathesis found these
        # answered 200).
        (b" \t\r\n", "not valid JSON"),
        (b"\x0b", "not valid JSON"),
        (b"\x0c", "not valid JSON"),
    ],
)
def test_bad_index_request(body: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        index_request_from_json(body)


def test_repository_request() -> None:
    assert repository_request_from_json(b"", "load") == {}
    body = b'{"parameters": {"unload_dependents": false, "n": 2}}'
    assert repository_request_from_json(body, "unload") == {"unload_dependents": False, "n": 2}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"parameters": []}', "load parameters must be an object"),
        (b'{"parameters": {"config": {"name": "x"}}}', "parameter 'config' must be a scalar"),
        (b'"x"', "load body must be a JSON object"),
    ],
)
def test_bad_repository_request(body: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        repository_request_from_json(body, "load")


def test_repository_parameters_from_proto() -> None:
    request = pb.RepositoryModelLoadRequest()
    request.parameters["flag"].bool_param = True
    request.parameters["n"].int64_param = 3
    request.parameters["config"].string_param = "{}"
    request.parameters["file:1/model.onnx"].bytes_param = b"\x00\x01"
    request.parameters["unset"].SetInParent()
    assert repository_parameters_from_proto(request.parameters) == {
        "flag": True,
        "n": 3,
        "config": "{}",
        "file:1/model.onnx": b"\x00\x01",
    }
