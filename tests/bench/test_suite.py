"""The suite: scenario definitions, profiles covering every target, payloads, and real
end-to-end runs (a ``cnnserve serve`` process, the echo and model-alone baselines; OIP REST,
``/predict`` and perf_analyzer against one gateway)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cnnserve.bench.payloads import (
    digit_pngs,
    oip_request,
    oip_rest_request,
    predict_request,
    rest_request,
)
from cnnserve.bench.perf_analyzer import parse as parse_perf_analyzer
from cnnserve.bench.report import TORCHSERVE_REST
from cnnserve.bench.suite import (
    DELAY_VARIANTS,
    PROCESS_VARIANTS,
    Scenario,
    profile,
    run_suite,
)
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol.grpc_codec import request_from_proto
from cnnserve.protocol.http_codec import decode_infer_request
from cnnserve.settings import Settings

BACKENDS = ["onnxruntime", "torchscript", "torchserve"]


def test_batching_off_never_merges_requests() -> None:
    off = Scenario("onnxruntime", "convnet", 28, 32, 8, batching=False).gateway_env()
    assert off["CNNSERVE_MAX_BATCH_SIZE"] == "32"
    assert off["CNNSERVE_MAX_BATCH_DELAY_MS"] == "0"
    on = Scenario("onnxruntime", "convnet", 28, 1, 8, batching=True).gateway_env()
    assert on["CNNSERVE_MAX_BATCH_SIZE"] == "32"
    assert "CNNSERVE_MAX_BATCH_DELAY_MS" not in on  # the gateway's own default


def test_variant_overrides_name_real_settings() -> None:
    fields = set(Settings.model_fields)
    for _, overrides in (*DELAY_VARIANTS, *PROCESS_VARIANTS):
        for key, _value in overrides:
            assert key in fields
    env = Scenario("onnxruntime", "convnet", 28, 1, 8, True, overrides=DELAY_VARIANTS[1][1])
    assert env.gateway_env()["CNNSERVE_ADAPTIVE_BATCH_DELAY"] == "false"


def test_quick_profile_measures_every_target() -> None:
    scenarios = profile("quick", BACKENDS)

    def has(**where: object) -> bool:
        return any(all(getattr(s, k) == v for k, v in where.items()) for s in scenarios)

    ort = {"backend": "onnxruntime", "model": "convnet", "items": 1, "concurrency": 64}
    assert has(**ort, variant="", payload="tensor", transport="grpc", client="loadgen")
    assert has(**ort, variant="", payload="png", transport="grpc")
    assert has(**ort, variant="", payload="tensor", transport="rest")
    assert has(backend="onnxruntime", items=32, variant="", client="loadgen")
    assert has(backend="torchserve", items=1, concurrency=64, payload="png", transport="grpc")
    assert has(backend="torchserve", concurrency=64, payload="png", transport="predict")
    alone = [s for s in scenarios if s.backend == TORCHSERVE_REST]
    assert {(s.concurrency, s.payload, s.torchserve_workers) for s in alone} == {
        (64, "png", 1),
        (64, "png", 2),
    }
    for name, _ in PROCESS_VARIANTS:
        assert has(**ort, variant=name)
    pa = {(s.items, s.concurrency) for s in scenarios if s.client == "perf_analyzer"}
    assert pa == {(1, 1), (1, 64), (32, 4)}
    # Every perf_analyzer point has the project's load generator at the same point.
    for items, c in pa:
        assert has(backend="onnxruntime", items=items, concurrency=c, variant="", client="loadgen")
    # Nothing that no target or trade-off reads.
    assert not has(batching=False)
    assert not has(model="fcn")


def test_full_profile_spans_the_matrix() -> None:
    scenarios = profile("full", BACKENDS)
    convnet = [
        s for s in scenarios if s.model == "convnet" and s.variant == "" and s.client == "loadgen"
    ]
    assert {s.concurrency for s in convnet} == {1, 8, 32, 64, 128}
    assert {s.items for s in convnet} == {1, 32}
    assert {s.batching for s in convnet} == {True, False}
    assert {s.backend for s in convnet} == set(BACKENDS)
    assert {s.transport for s in convnet} == {"grpc", "rest", "predict"}
    assert {s.torchserve_workers for s in scenarios if s.backend == TORCHSERVE_REST} == {1, 2}
    assert {s.side for s in scenarios if s.model == "fcn"} == {28, 128, 256}


def test_payloads_carry_what_they_say() -> None:
    message = pb.ModelInferRequest.FromString(oip_request("convnet", 28, 3, "png"))
    request = request_from_proto(message, None)
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("image", "BYTES", (3,))
    assert list(tensor.data) == digit_pngs(3)
    message = pb.ModelInferRequest.FromString(oip_request("fcn", 16, 2, "tensor"))
    (tensor,) = request_from_proto(message, None).inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("input", "FP32", (2, 3, 16, 16))
    assert np.abs(tensor.data).max() <= 1
    rest = rest_request("127.0.0.1:8080", "convnet", "secret")
    head, _, body = rest.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /predictions/convnet HTTP/1.1")
    assert b"Authorization: Bearer secret" in head
    assert body == digit_pngs(1)[0]
    head, _, body = predict_request("127.0.0.1:8000", "convnet").partition(b"\r\n\r\n")
    assert head.startswith(b"POST /predict/convnet HTTP/1.1")
    assert b"Content-Type: image/png" in head
    assert body == digit_pngs(1)[0]


def test_rest_binary_payload_is_the_grpc_request() -> None:
    for items, payload in ((2, "tensor"), (3, "png"), (1, "tensor")):
        raw = oip_rest_request("127.0.0.1:8000", "convnet", 28, items, payload)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"POST /v2/models/convnet/infer HTTP/1.1")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
        assert int(headers["Content-Length"]) == len(body)
        decoded = decode_infer_request(
            body, int(headers["Inference-Header-Content-Length"]), "convnet", ""
        )
        assert decoded.binary_default  # the outputs come back binary too
        (tensor,) = decoded.request.inputs
        grpc = request_from_proto(
            pb.ModelInferRequest.FromString(oip_request("convnet", 28, items, payload)), None
        )
        (expected,) = grpc.inputs
        assert (tensor.name, tensor.datatype, tensor.shape) == (
            expected.name,
            expected.datatype,
            expected.shape,
        )
        assert list(np.asarray(tensor.data).ravel()) == list(np.asarray(expected.data).ravel())


def test_one_scenario_end_to_end(artifacts_dir: Path, tmp_path: Path) -> None:
    scenario = Scenario("onnxruntime", "convnet", 28, 1, 4, batching=True)
    rows = run_suite([scenario], artifacts_dir, tmp_path, 1.0, 0.3, 1)
    (row,) = rows
    assert row["label"] == scenario.label
    assert row["errors"] == {}
    assert row["succeeded"] > 0
    assert 1 <= row["mean_batch_size"] <= 4
    assert row["model_alone_batch"] == max(1, round(row["mean_batch_size"]))
    assert row["model_alone_images_per_s"] > 0
    assert row["echo_requests_per_s"] > 0
    assert row["gateway_rss_end_mb"] > 0
    # Every request costs the gateway some CPU, and far less than a second.
    assert 0 < row["gateway_cpu_ms_per_request"] < 1000
    written = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert written == rows


def test_http_transports_and_perf_analyzer_against_one_gateway(
    artifacts_dir: Path, tmp_path: Path
) -> None:
    """OIP REST (binary), /predict with a PNG body and perf_analyzer, each against the same
    real gateway process; perf_analyzer's row says why when it cannot be had here."""
    scenarios = [
        Scenario("onnxruntime", "convnet", 28, 2, 3, True, transport="rest"),
        Scenario("onnxruntime", "convnet", 28, 1, 2, True, payload="png", transport="predict"),
        Scenario("onnxruntime", "convnet", 28, 3, 2, True, client="perf_analyzer"),
    ]
    # Seconds enough that a first call slowed by a busy host still leaves calls to measure.
    measured = run_suite(scenarios, artifacts_dir, tmp_path, 2.0, 0.5, 1)
    rows = {row["label"]: row for row in measured}
    assert set(rows) == {s.label for s in scenarios}
    for scenario in scenarios[:2]:
        row = rows[scenario.label]
        assert row["errors"] == {}
        assert row["succeeded"] > 0
        assert row["images_per_s"] == pytest.approx(scenario.items * row["requests_per_s"])
        assert 1 <= row["mean_batch_size"] <= scenario.items * scenario.concurrency
        assert "echo_requests_per_s" not in row  # the echo is a gRPC baseline
    pa = rows[scenarios[2].label]
    if pa["perf_analyzer_ok"]:
        assert pa["requests"] > 0
        assert pa["images_per_s"] == pytest.approx(3 * pa["requests_per_s"])
        assert 0 < pa["p50_ms"] <= pa["p99_ms"]
        # Requests of 3 items from at most 2 callers: batches of 3 to 6 items.
        assert 3 <= pa["perf_analyzer_mean_batch_size"] <= 6
        assert 3 <= pa["mean_batch_size"] <= 6
    else:
        assert "perf_analyzer" in pa["perf_analyzer_reason"]
        assert pa["requests"] == 0


def test_perf_analyzer_output_is_read_as_printed() -> None:
    stdout = (
        "Request concurrency: 4\n  Client: \n    Request count: 120\n"
        "    Throughput: 1920 infer/sec\n  Server: \n    Inference count: 3840\n"
        "    Execution count: 60\n"
    )
    csv_text = (
        "Concurrency,Inferences/Second,Client Send,p50 latency,p90 latency,p95 latency,"
        "p99 latency\n4,1920,3,2000,2500,2700,4000\n"
    )
    result = parse_perf_analyzer(stdout, csv_text, 32)
    assert result.ok
    assert (result.requests, result.requests_per_s, result.images_per_s) == (120, 60.0, 1920.0)
    assert (result.p50_ms, result.p90_ms, result.p99_ms) == (2.0, 2.5, 4.0)
    assert result.mean_batch_size == 64.0
    assert not parse_perf_analyzer("", "Concurrency,Inferences/Second\n", 1).ok
