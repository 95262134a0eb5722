"""The committed Open Inference Protocol stubs are wire-compatible with the standard.

Compared field by field with Triton's own generated descriptors (shipped in tritonclient):
every message cnnserve defines must exist in Triton's, and each of its fields must have the
same number, name, type and cardinality as Triton's field of that number (cnnserve leaves out
fields it never fills, such as most of the model configuration); every enum value the same
number; every RPC the same input, output and streaming shape, or standard clients break.
Triton's stubs declare the same ``inference.*`` symbols as ours, so one process cannot load
both; they are read in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, FileDescriptor

from cnnserve.protocol import model_config_pb2 as ours_config
from cnnserve.protocol import open_inference_pb2 as ours

SERVICE = "GRPCInferenceService"

# Prints the same table as _describe() for the given module's file descriptor.
DESCRIBE_SOURCE = """
import json, sys
def fields(m):
    return {str(f.number): [f.name, f.type, f.is_repeated,
            f.message_type.full_name if f.message_type else "",
            f.containing_oneof.name if f.containing_oneof else ""] for f in m.fields}
def values(e):
    return {e.full_name: {v.name: v.number for v in e.values}}
def walk(m, messages, enums):
    messages[m.full_name] = fields(m)
    for e in m.enum_types:
        enums.update(values(e))
    for n in m.nested_types:
        walk(n, messages, enums)
def describe(service_file, config_file):
    messages, enums = {}, {}
    for fd in (service_file, config_file):
        for m in fd.message_types_by_name.values():
            walk(m, messages, enums)
        for e in fd.enum_types_by_name.values():
            enums.update(values(e))
    service = service_file.services_by_name["GRPCInferenceService"]
    rpcs = {m.name: [m.input_type.full_name, m.output_type.full_name,
                     m.client_streaming, m.server_streaming] for m in service.methods}
    return {"package": service_file.package, "service": service.full_name,
            "messages": messages, "enums": enums, "rpcs": rpcs}
"""


def _describe(service_file: FileDescriptor, config_file: FileDescriptor) -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(DESCRIBE_SOURCE, namespace)
    # Round-trip through JSON so both sides compare as the same plain types.
    described = namespace["describe"](service_file, config_file)
    return json.loads(json.dumps(described))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def triton() -> dict[str, Any]:
    """Triton's own descriptors, described in a separate interpreter."""
    script = (
        DESCRIBE_SOURCE
        + "from tritonclient.grpc import model_config_pb2, service_pb2\n"
        + "print(json.dumps(describe(service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


OURS = _describe(ours.DESCRIPTOR, ours_config.DESCRIPTOR)


def test_package_and_service_names() -> None:
    assert OURS["package"] == "inference"
    assert OURS["service"] == "inference.GRPCInferenceService"


@pytest.mark.parametrize("name", sorted(OURS["messages"]))
def test_message_matches_triton(name: str, triton: dict[str, Any]) -> None:
    fields = OURS["messages"][name]
    theirs = triton["messages"][name]
    assert {number: theirs.get(number) for number in fields} == fields


def test_inference_messages_are_complete(triton: dict[str, Any]) -> None:
    """Requests and responses of inference carry every field Triton's do: a field left out
    there would be silently dropped from a client's request."""
    for name, fields in OURS["messages"].items():
        if name.startswith(("inference.ModelInfer", "inference.ModelStreamInfer")):
            assert fields == triton["messages"][name], name


@pytest.mark.parametrize("name", sorted(OURS["enums"]))
def test_enum_matches_triton(name: str, triton: dict[str, Any]) -> None:
    assert OURS["enums"][name] == triton["enums"][name]


def test_every_rpc_matches_triton(triton: dict[str, Any]) -> None:
    assert set(OURS["rpcs"]) == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    }
    for name, shape in OURS["rpcs"].items():
        assert shape == triton["rpcs"][name], name
    assert OURS["rpcs"]["ModelStreamInfer"][2:] == [True, True]


def test_infer_parameter_has_all_five_choices() -> None:
    message: Descriptor = ours.InferParameter.DESCRIPTOR
    choices = message.oneofs_by_name["parameter_choice"]
    assert [f.name for f in choices.fields] == [
        "bool_param",
        "int64_param",
        "string_param",
        "double_param",
        "uint64_param",
    ]
