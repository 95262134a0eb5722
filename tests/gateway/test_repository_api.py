"""Triton's model repository, model configuration and statistics extensions, end to end.

A real ``cnnserve serve`` process in explicit model control mode serves a copy of the default
repository with three more folders: ``segmenter`` (the FCN again, the gRPC test's own model,
so the two transports' tests do not load and unload each other's), ``broken`` (a config that
cannot be read) and per-model batching on the ConvNet. It is called with the unmodified
tritonclient — HTTP in this process, gRPC in a process of its own (its protobuf stubs declare
the same ``inference.*`` symbols as ours) — and with raw HTTP and cnnserve's own stubs where
an exact status or an unusual request is the point.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from tests.images import shapes_png
from tests.support import GatewayProcess, gateway_process

EXTENSIONS = {
    "model_repository",
    "model_repository(unload_dependents)",
    "model_configuration",
    "statistics",
}
UNSAFE_NAMES = ["..", "a/b", "\x00", "a" * 300]
#: The server's batching settings; the ConvNet's config.yaml sets its own.
MAX_BATCH_SIZE = 16
MAX_BATCH_DELAY_MS = 1.0
DEFAULT_TIMEOUT_MS = 5000


@pytest.fixture(scope="module")
def repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default repository, plus ``segmenter``, ``broken``, and the ConvNet's batching."""
    root = tmp_path_factory.mktemp("repository_api") / "models"
    shutil.copytree(model_repository, root)
    shutil.copytree(root / "fcn", root / "segmenter")
    with (root / "segmenter" / "config.yaml").open("a") as config:
        config.write("version_policy:\n  all: {}\n")
    with (root / "convnet" / "config.yaml").open("a") as config:
        config.write("batching:\n  max_batch_size: 8\n  max_batch_delay_ms: 3\n")
    (root / "broken").mkdir()
    (root / "broken" / "config.yaml").write_text("architecture: resnet\n")
    return root


@pytest.fixture(scope="module")
def gateway(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The gateway in explicit mode with only the ConvNet loaded at start."""
    log = tmp_path_factory.mktemp("repository_gateway") / "gateway.log"
    with gateway_process(
        "onnxruntime",
        log,
        model_repository=repository,
        model_control_mode="explicit",
        load_models=json.dumps(["convnet"]),
        device="cpu",
        max_batch_size=MAX_BATCH_SIZE,
        max_batch_delay_ms=MAX_BATCH_DELAY_MS,
        default_timeout_ms=DEFAULT_TIMEOUT_MS,
    ) as running:
        yield running
    text = running.output()
    assert "Traceback" not in text, text[-4000:]


@pytest.fixture
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    """Raw HTTP, for bodies and paths tritonclient does not send."""
    with httpx.Client(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=30) as client:
        yield client


@pytest.fixture
def stub(gateway: GatewayProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    """cnnserve's own gRPC stub."""
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def _index(client: httpclient.InferenceServerClient) -> dict[str, dict[str, str]]:
    return {row["name"]: row for row in client.get_model_repository_index()}


def _image_input(png: bytes, per_item: int = 1) -> httpclient.InferInput:
    """One image, shaped ``[1,per_item]`` as the model's metadata says (``[-1,1]``)."""
    image = httpclient.InferInput("image", [1, per_item], "BYTES")
    image.set_data_from_numpy(np.array([[png] * per_item], dtype=np.object_))
    return image


# --- tritonclient over HTTP ---


def test_server_metadata_names_the_extensions(gateway: GatewayProcess) -> None:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{gateway.http_port}")
    assert set(client.get_server_metadata()["extensions"]) >= EXTENSIONS


def test_index_before_any_load(gateway: GatewayProcess) -> None:
    index = _index(httpclient.InferenceServerClient(f"127.0.0.1:{gateway.http_port}"))
    assert set(index) == {"broken", "convnet", "fcn", "segmenter"}
    assert index["convnet"] == {"name": "convnet", "version": "1", "state": "READY"}
    assert index["fcn"]["state"] == "UNAVAILABLE"
    assert "version" not in index["fcn"]
    assert "explicit" in index["fcn"]["reason"]


def test_tritonclient_http_load_config_infer_statistics_unload(gateway: GatewayProcess) -> None:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{gateway.http_port}")
    client.load_model("fcn")
    assert _index(client)["fcn"] == {"name": "fcn", "version": "1", "state": "READY"}
    assert client.is_model_ready("fcn")

    config = client.get_model_config("fcn")
    assert config["name"] == "fcn"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == MAX_BATCH_SIZE
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert config["input"] == [
        {
            "name": "input",
            "data_type": "TYPE_FP32",
            "format": "FORMAT_NCHW",
            "dims": [3, -1, -1],
            "optional": True,
        },
        {
            "name": "pixels",
            "data_type": "TYPE_UINT8",
            "format": "FORMAT_NCHW",
            "dims": [3, -1, -1],
            "optional": True,
        },
        {
            "name": "image",
            "data_type": "TYPE_STRING",
            "format": "FORMAT_NONE",
            "dims": [1],
            "optional": True,
        },
    ]
    assert config["output"] == [
        {"name": "scores", "data_type": "TYPE_FP32", "dims": [4, -1, -1]},
        {"name": "mask", "data_type": "TYPE_UINT8", "dims": [-1, -1]},
        {"name": "counts", "data_type": "TYPE_INT64", "dims": [4]},
        # The feature maps (docs/feature-maps.md).
        {"name": "conv1", "data_type": "TYPE_FP32", "dims": [32, -1, -1]},
        {"name": "conv2", "data_type": "TYPE_FP32", "dims": [64, -1, -1]},
        {"name": "conv3", "data_type": "TYPE_FP32", "dims": [128, -1, -1]},
        {"name": "unsample1", "data_type": "TYPE_FP32", "dims": [64, -1, -1]},
        {"name": "unsample2", "data_type": "TYPE_FP32", "dims": [32, -1, -1]},
    ]
    assert config["dynamic_batching"] == {
        "max_queue_delay_microseconds": round(MAX_BATCH_DELAY_MS * 1000),
        "default_queue_policy": {
            "timeout_action": "REJECT",
            "default_timeout_microseconds": DEFAULT_TIMEOUT_MS * 1000,
            "allow_timeout_override": True,
            "max_queue_size": 512,
        },
    }

    png, _ = shapes_png(0)
    result = client.infer(
        "fcn", [_image_input(png)], outputs=[httpclient.InferRequestedOutput("mask")]
    )
    mask = result.as_numpy("mask")
    assert mask is not None and mask.ndim == 3 and mask.shape[0] == 1

    (stats,) = client.get_inference_statistics("fcn")["model_stats"]
    assert (stats["name"], stats["version"]) == ("fcn", "1")
    assert stats["inference_count"] == 1
    assert stats["execution_count"] == 1
    assert stats["last_inference"] > 0
    inference = stats["inference_stats"]
    for step in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[step]["count"] == 1, step
        assert inference[step]["ns"] > 0, step
    assert inference["fail"] == inference["cache_hit"] == {"count": 0, "ns": 0}
    (batch,) = stats["batch_stats"]
    assert batch["batch_size"] == 1
    assert batch["compute_infer"]["count"] == 1

    with pytest.raises(InferenceServerException) as two_per_row:
        client.infer("fcn", [_image_input(png, per_item=2)])
    assert two_per_row.value.status() == "400"
    assert "[N,1] or [N]" in two_per_row.value.message()
    (stats,) = client.get_inference_statistics("fcn")["model_stats"]
    assert stats["inference_stats"]["fail"]["count"] == 1
    assert stats["inference_count"] == 1

    client.unload_model("fcn")
    assert _index(client)["fcn"]["state"] == "UNAVAILABLE"
    with pytest.raises(InferenceServerException) as refused:
        client.infer("fcn", [_image_input(png)])
    assert refused.value.status() == "503"
    with pytest.raises(InferenceServerException) as gone:
        client.get_inference_statistics("fcn")
    assert gone.value.status() == "404"


def test_config_and_statistics_of_the_convnet(gateway: GatewayProcess) -> None:
    """The model's own batching section wins over the server's settings; versions by path."""
    client = httpclient.InferenceServerClient(f"127.0.0.1:{gateway.http_port}")
    config = client.get_model_config("convnet", "1")
    assert config["max_batch_size"] == 8
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 3000
    assert [i["dims"] for i in config["input"]] == [[3, 28, 28], [3, 28, 28], [1]]
    assert config["output"][0] == {"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}
    every = client.get_inference_statistics()["model_stats"]
    assert ("convnet", "1") in {(s["name"], s["version"]) for s in every}
    (one,) = client.get_inference_statistics("convnet", "1")["model_stats"]
    assert one["name"] == "convnet"
    for call in (
        lambda: client.get_model_config("convnet", "7"),
        lambda: client.get_inference_statistics("convnet", "7"),
    ):
        with pytest.raises(InferenceServerException) as missing:
            call()
        assert missing.value.status() == "404"
        assert "available versions: 1" in missing.value.message()


def test_ready_index(http: httpx.Client) -> None:
    rows = http.post("/v2/repository/index", json={"ready": True}).json()
    assert rows
    assert {row["state"] for row in rows} == {"READY"}
    assert "broken" not in {row["name"] for row in rows}


# --- refusals over HTTP ---


@pytest.mark.parametrize("name", UNSAFE_NAMES)
@pytest.mark.parametrize(
    ("method", "route"),
    [
        ("POST", "/v2/repository/models/{}/load"),
        ("POST", "/v2/repository/models/{}/unload"),
        ("GET", "/v2/models/{}/config"),
        ("GET", "/v2/models/{}/stats"),
    ],
)
def test_unsafe_names_are_bad_input(http: httpx.Client, method: str, route: str, name: str) -> None:
    # Percent-encoded, so that no client resolves ".." or splits on "/" before the server.
    reply = http.request(method, route.format(quote(name, safe="").replace(".", "%2E")))
    assert reply.status_code == 400, reply.text
    assert "model name" in reply.json()["error"]


@pytest.mark.parametrize(
    ("method", "route"),
    [
        ("POST", "/v2/repository/models/nosuch/load"),
        ("POST", "/v2/repository/models/nosuch/unload"),
        ("GET", "/v2/models/nosuch/config"),
        ("GET", "/v2/models/nosuch/stats"),
    ],
)
def test_unknown_models_are_not_found(http: httpx.Client, method: str, route: str) -> None:
    reply = http.request(method, route)
    assert reply.status_code == 404, reply.text
    assert "nosuch" in reply.json()["error"]


def test_a_model_that_cannot_load_says_why(http: httpx.Client) -> None:
    reply = http.post("/v2/repository/models/broken/load")
    assert reply.status_code == 503
    assert "architecture" in reply.json()["error"]
    (row,) = [r for r in http.post("/v2/repository/index").json() if r["name"] == "broken"]
    assert row["state"] == "UNAVAILABLE"
    assert "config.yaml" in row["reason"]


@pytest.mark.parametrize(
    ("route", "body", "message"),
    [
        ("/v2/repository/index", {"ready": "yes"}, "'ready' must be true or false"),
        ("/v2/repository/index", [True], "must be a JSON object"),
        ("/v2/repository/models/fcn/load", {"parameters": {"config": "{}"}}, "config.yaml"),
        ("/v2/repository/models/fcn/load", {"parameters": {"file:1/model.onnx": "AA=="}}, "export"),
        ("/v2/repository/models/fcn/load", {"parameters": []}, "must be an object"),
        ("/v2/repository/models/convnet/unload", {"parameters": {"force": True}}, "force"),
        (
            "/v2/repository/models/convnet/unload",
            {"parameters": {"unload_dependents": "yes"}},
            "true or false",
        ),
    ],
)
def test_bad_bodies_are_bad_input(http: httpx.Client, route: str, body: Any, message: str) -> None:
    reply = http.post(route, json=body)
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["error"]


# --- gRPC: cnnserve's stubs for exact codes, tritonclient in its own process ---


def test_grpc_config_statistics_and_index(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    config = stub.ModelConfig(pb.ModelConfigRequest(name="convnet")).config
    assert (config.name, config.max_batch_size) == ("convnet", 8)
    assert [list(i.dims) for i in config.input] == [[3, 28, 28], [3, 28, 28], [1]]
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 512
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="convnet", version="1"))
    assert [(s.name, s.version) for s in stats.model_stats] == [("convnet", "1")]
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert ("convnet", "1", "READY") in {(m.name, m.version, m.state) for m in index.models}


@pytest.mark.parametrize(
    ("call", "code"),
    [
        ("load:..", grpc.StatusCode.INVALID_ARGUMENT),
        ("load:a/b", grpc.StatusCode.INVALID_ARGUMENT),
        ("load:\x00", grpc.StatusCode.INVALID_ARGUMENT),
        ("load:" + "a" * 300, grpc.StatusCode.INVALID_ARGUMENT),
        ("unload:..", grpc.StatusCode.INVALID_ARGUMENT),
        ("config:a/b", grpc.StatusCode.INVALID_ARGUMENT),
        ("stats:..", grpc.StatusCode.INVALID_ARGUMENT),
        ("load:nosuch", grpc.StatusCode.NOT_FOUND),
        ("unload:nosuch", grpc.StatusCode.NOT_FOUND),
        ("config:nosuch", grpc.StatusCode.NOT_FOUND),
        ("stats:nosuch", grpc.StatusCode.NOT_FOUND),
        ("load:broken", grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_grpc_refusals(
    stub: pb_grpc.GRPCInferenceServiceStub, call: str, code: grpc.StatusCode
) -> None:
    kind, name = call.split(":", 1)
    rpc: dict[str, Any] = {
        "load": lambda: stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name)),
        "unload": lambda: stub.RepositoryModelUnload(
            pb.RepositoryModelUnloadRequest(model_name=name)
        ),
        "config": lambda: stub.ModelConfig(pb.ModelConfigRequest(name=name)),
        "stats": lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name=name)),
    }
    with pytest.raises(grpc.RpcError) as refused:
        rpc[kind]()
    assert refused.value.code() == code, refused.value.details()


def test_grpc_refuses_other_repositories_and_uploads(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as other:
        stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="elsewhere"))
    assert other.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "one model repository" in other.value.details()
    upload = pb.RepositoryModelLoadRequest(model_name="segmenter")
    upload.parameters["file:1/model.onnx"].bytes_param = b"\x08\x01"
    with pytest.raises(grpc.RpcError) as uploaded:
        stub.RepositoryModelLoad(upload)
    assert uploaded.value.code() == grpc.StatusCode.INVALID_ARGUMENT


TRITON_GRPC_SCRIPT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url, png = sys.argv[1], bytes.fromhex(sys.argv[2])
client = grpcclient.InferenceServerClient(url)
out = {"extensions": client.get_server_metadata(as_json=True)["extensions"]}
out["before"] = client.get_model_repository_index(as_json=True)["models"]
client.load_model("segmenter")
out["ready"] = client.is_model_ready("segmenter")
out["config"] = client.get_model_config("segmenter", as_json=True)["config"]
image = grpcclient.InferInput("image", [1], "BYTES")
image.set_data_from_numpy(np.array([png], dtype=np.object_))
result = client.infer("segmenter", [image], outputs=[grpcclient.InferRequestedOutput("counts")])
out["counts"] = result.as_numpy("counts").tolist()
out["stats"] = client.get_inference_statistics("segmenter", as_json=True)["model_stats"]
client.unload_model("segmenter", unload_dependents=False)
out["after"] = client.get_model_repository_index(as_json=True)["models"]
errors = {}
for name in ("..", "a/b", "nosuch"):
    try:
        client.load_model(name)
    except InferenceServerException as exc:
        errors[name] = exc.status()
out["errors"] = errors
print(json.dumps(out))
"""


def test_tritonclient_grpc_works_unmodified(gateway: GatewayProcess) -> None:
    png, _ = shapes_png(1)
    argv = [sys.executable, "-c", TRITON_GRPC_SCRIPT, gateway.grpc_target, png.hex()]
    out = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
    assert set(out["extensions"]) >= EXTENSIONS

    def segmenter(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        return [row for row in rows if row["name"] == "segmenter"]

    (before,) = segmenter(out["before"])
    assert before["state"] == "UNAVAILABLE"
    assert out["ready"] is True
    config = out["config"]
    # tritonclient renders the message with protobuf's JSON mapping (proto field names, 64-bit
    # integers as strings, fields at their default left out).
    assert config["name"] == "segmenter"
    assert config["version_policy"] == {"all": {}}
    assert config["max_batch_size"] == MAX_BATCH_SIZE
    assert [i["name"] for i in config["input"]] == ["input", "pixels", "image"]
    assert config["input"][0]["dims"] == ["3", "-1", "-1"]
    (counts,) = out["counts"]
    assert len(counts) == 4 and sum(counts) > 0
    (stats,) = out["stats"]
    assert stats["inference_count"] == "1"
    assert stats["inference_stats"]["success"]["count"] == "1"
    (after,) = segmenter(out["after"])
    assert (after["version"], after["state"]) == ("1", "UNAVAILABLE")
    assert out["errors"] == {
        "..": "StatusCode.INVALID_ARGUMENT",
        "a/b": "StatusCode.INVALID_ARGUMENT",
        "nosuch": "StatusCode.NOT_FOUND",
    }
