"""The suite: scenario definitions, profiles covering every target, payloads, and one real
end-to-end scenario (a ``cnnserve serve`` process, the echo and model-alone baselines)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cnnserve.bench.payloads import digit_pngs, oip_request, rest_request
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

    ort = {"backend": "onnxruntime", "model": "convnet", "variant": ""}
    assert has(**ort, items=1, concurrency=64, batching=True)
    assert has(**ort, items=1, concurrency=64, batching=False)
    assert has(**ort, items=1, concurrency=1, batching=True)
    assert has(**ort, items=32, batching=True)
    assert has(backend="torchserve", items=1, concurrency=64, payload="png")
    assert has(backend=TORCHSERVE_REST, concurrency=64, payload="png")
    assert {s.side for s in scenarios if s.model == "fcn"} == {28, 128, 256}
    variants = {name for name, _ in (*DELAY_VARIANTS, *PROCESS_VARIANTS)}
    assert {s.variant for s in scenarios} == {"", *variants}


def test_full_profile_spans_the_issue_matrix() -> None:
    scenarios = profile("full", BACKENDS)
    convnet = [s for s in scenarios if s.model == "convnet" and s.variant == ""]
    assert {s.concurrency for s in convnet} == {1, 8, 32, 64, 128}
    assert {s.items for s in convnet} == {1, 32}
    assert {s.batching for s in convnet} == {True, False}
    assert {s.backend for s in convnet} == {*BACKENDS, TORCHSERVE_REST}
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
    written = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert written == rows
