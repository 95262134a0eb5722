"""Triton's perf_analyzer — the unmodified binary, through ``tools/perf_analyzer.sh`` — drives a
real gateway over gRPC and HTTP: it reads the model's metadata and config, sends the pixels
``tools/perf_analyzer_data.py`` wrote, and reports a throughput; the gateway counts every
request it answered a success.

Where the script cannot have perf_analyzer (exit 3: no Debian archive, no network), the tests
skip with its reason, except in CI, which must run them.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cnnserve.bench.perf_analyzer import DATA_WRITER, SCRIPT, UNAVAILABLE
from tests.support import GatewayProcess, gateway_process

#: perf_analyzer sends exactly this many requests in its one measurement (--request-count).
REQUESTS = 200
CONCURRENCY = 4


@pytest.fixture(scope="module")
def perf_analyzer() -> Path:
    """The script, with the binary and its libraries in place (the first time: a download)."""
    prepared = subprocess.run(
        [str(SCRIPT), "--prepare"], capture_output=True, text=True, timeout=900, check=False
    )
    if prepared.returncode == UNAVAILABLE and not os.environ.get("CI"):
        pytest.skip(prepared.stderr.strip())
    assert prepared.returncode == 0, prepared.stderr
    return SCRIPT


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, model_repository: Path
) -> Iterator[GatewayProcess]:
    """A gateway serving the default repository (convnet and fcn, version 1) with ONNX Runtime."""
    log = tmp_path_factory.mktemp("perf_analyzer") / "gateway.log"
    with gateway_process("onnxruntime", log, model_repository=model_repository) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def pixels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """perf_analyzer's input data: convnet's UINT8 ``pixels``, the one input it sends."""
    path = tmp_path_factory.mktemp("perf_analyzer") / "pixels.json"
    subprocess.run([sys.executable, str(DATA_WRITER), str(path)], check=True, timeout=60)
    return path


def outcomes(gateway: GatewayProcess) -> dict[str, float]:
    """The gateway's finished convnet requests by outcome (success or the error kind)."""
    reply = httpx.get(gateway.metrics_url, timeout=10.0)
    reply.raise_for_status()
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
        if sample.name == "cnnserve_requests_total" and sample.labels["model"] == "convnet"
    }


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_measures_convnet(
    perf_analyzer: Path, gateway: GatewayProcess, pixels: Path, protocol: str, tmp_path: Path
) -> None:
    port = gateway.grpc_port if protocol == "grpc" else gateway.http_port
    before = outcomes(gateway)
    report = tmp_path / "latency.csv"
    export = tmp_path / "profile.json"
    command = [
        str(perf_analyzer), "-m", "convnet", "-i", protocol, "-u", f"127.0.0.1:{port}",
        "--input-data", str(pixels), "--concurrency-range", str(CONCURRENCY),
        "--request-count", str(REQUESTS), "-f", str(report), "--profile-export-file", str(export),
    ]  # fmt: skip
    environ = {**os.environ, "PERF_ANALYZER_TIMEOUT_S": "240"}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, env=environ
    )
    assert result.returncode == 0, result.stdout + result.stderr

    with report.open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["Concurrency"]) == CONCURRENCY
    assert float(row["Inferences/Second"]) > 0
    assert 0 < float(row["p50 latency"]) <= float(row["p99 latency"])
    # Every request perf_analyzer measured came back; the gateway answered all it received
    # (the measured ones and those in flight around them) with a success.
    (experiment,) = json.loads(export.read_text())["experiments"]
    measured = experiment["requests"]
    assert len(measured) >= REQUESTS
    assert all(request["response_timestamps"] for request in measured)
    after = outcomes(gateway)
    grown = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    assert set(grown) == {"success"}, grown
    assert grown["success"] >= len(measured)
