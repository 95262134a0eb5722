"""The benchmark suite: scenarios against real gateway processes, baselines, and the report.

Every figure comes from one run on one machine, so ratios between them are meaningful even on
a noisy shared host: each scenario's gateway is compared with the compute ceiling (the model
alone at the batch sizes the batcher formed) and the RPC ceiling (a bare grpc.aio echo of the
same payload) measured in the same run.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import platform
import statistics
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve.models.registry import get_spec
from cnnserve.models.runtime import ArtifactFormat, load_runner

from .echo import serve_echo_forever
from .gateway_process import GatewayProcess, free_port, start_gateway
from .loadgen import LoadResult, LoadSpec, check_request, infer_request, run_load
from .scrape import batch_sizes

logger = logging.getLogger(__name__)

#: The in-process format each backend's model runs as (TorchServe's handlers run TorchScript).
BACKEND_FORMAT: dict[str, ArtifactFormat] = {
    "onnxruntime": "onnx",
    "torchscript": "torchscript",
    "torchserve": "torchscript",
}
BATCHING_MAX_BATCH_SIZE = 32
BATCHING_DELAY_MS = 2.0


@dataclass(frozen=True)
class Scenario:
    """One measured point."""

    backend: str
    model: str
    side: int
    items: int
    concurrency: int
    batching: bool

    @property
    def label(self) -> str:
        """Short human-readable name."""
        mode = "batching" if self.batching else "no-batching"
        return f"{self.backend}/{self.model}@{self.side}/{self.items}img/c{self.concurrency}/{mode}"


def profile(name: str, backends: Iterable[str]) -> list[Scenario]:
    """The scenario list: ``quick`` (minutes, for a check) or ``full`` (the issue's matrix)."""
    backends = list(backends)
    out: list[Scenario] = []
    if name == "quick":
        for backend in backends:
            for batching in (True, False):
                for c in (1, 8, 64):
                    out.append(Scenario(backend, "convnet", 28, 1, c, batching))
            out.append(Scenario(backend, "convnet", 28, 32, 4, True))
        out.append(Scenario(backends[0], "fcn", 128, 1, 8, True))
        return out
    for backend in backends:
        for batching in (True, False):
            for c in (1, 8, 32, 64, 128):
                out.append(Scenario(backend, "convnet", 28, 1, c, batching))
            for c in (1, 8):
                out.append(Scenario(backend, "convnet", 28, 32, c, batching))
        for side in (28, 128, 256):
            for c in (1, 8, 32):
                out.append(Scenario(backend, "fcn", side, 1, c, True))
    return out


def _gateway_env(scenario: Scenario, artifacts: Path) -> dict[str, str]:
    max_batch = BATCHING_MAX_BATCH_SIZE if scenario.batching else scenario.items
    return {
        "CNNSERVE_ARTIFACTS_DIR": str(artifacts),
        "CNNSERVE_MAX_BATCH_SIZE": str(
            max(max_batch, scenario.items) if scenario.batching else max_batch
        ),
        "CNNSERVE_MAX_BATCH_DELAY_MS": str(BATCHING_DELAY_MS if scenario.batching else 0.0),
        "CNNSERVE_MAX_QUEUE_SIZE": "8192",
    }


def _payload(scenario: Scenario) -> bytes:
    rng = np.random.default_rng(0)
    items = rng.uniform(-1, 1, size=(scenario.items, 3, scenario.side, scenario.side)).astype(
        np.float32
    )
    return infer_request(scenario.model, items)


@contextmanager
def echo_server() -> Iterator[str]:
    """A bare gRPC echo server in its own process; yields its target."""
    port = free_port()
    process = multiprocessing.get_context("spawn").Process(
        target=serve_echo_forever, args=("127.0.0.1", port), daemon=True
    )
    process.start()
    target = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                check_request(target, infer_request("echo", np.zeros((1, 3, 7, 7), np.float32)), 2)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield target
    finally:
        process.kill()
        process.join()


def model_alone(
    backend: str, model: str, side: int, batch: int, artifacts: Path, seconds: float = 3.0
) -> dict[str, float]:
    """The compute ceiling: the runner alone on ``batch`` items, images/s and p50 ms per batch."""
    fmt = BACKEND_FORMAT[backend]
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    runner = load_runner(artifacts / f"{model}{suffix}", fmt, device="cpu")
    x = np.random.default_rng(0).uniform(-1, 1, size=(batch, 3, side, side)).astype(np.float32)
    for _ in range(3):
        runner.infer(x)
    times: list[float] = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        started = time.perf_counter()
        runner.infer(x)
        times.append(time.perf_counter() - started)
    total = sum(times)
    return {"images_per_s": batch * len(times) / total, "p50_ms": statistics.median(times) * 1000}


def run_suite(
    scenarios: list[Scenario],
    artifacts: Path,
    out_dir: Path,
    duration_s: float,
    warmup_s: float,
    processes: int,
) -> list[dict[str, Any]]:
    """Run every scenario (one gateway per configuration) and its baselines; return rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "gateway.log"
    rows: list[dict[str, Any]] = []
    echo_cache: dict[tuple[str, int, int, int], LoadResult] = {}
    groups: dict[tuple[str, bool, int], list[Scenario]] = {}
    for scenario in scenarios:
        groups.setdefault((scenario.backend, scenario.batching, scenario.items), []).append(
            scenario
        )
    for (backend, _batching, _items), members in groups.items():
        gateway = start_gateway(backend, _gateway_env(members[0], artifacts), log_path)
        try:
            rss_start = gateway.rss_bytes()
            for scenario in members:
                rows.append(_measure(scenario, gateway, duration_s, warmup_s, processes))
                rows[-1]["gateway_rss_start_mb"] = rss_start / 2**20
                logger.info("%s: %.0f req/s", scenario.label, rows[-1]["requests_per_s"])
        finally:
            gateway.stop()
    with echo_server() as echo_target:
        for row in rows:
            key = (row["model"], row["side"], row["items"], row["concurrency"])
            if key not in echo_cache:
                scenario = Scenario(
                    row["backend"],
                    row["model"],
                    row["side"],
                    row["items"],
                    row["concurrency"],
                    True,
                )
                echo_cache[key] = run_load(
                    LoadSpec(echo_target, _payload(scenario), scenario.items, duration_s, warmup_s,
                             scenario.concurrency, processes=processes)
                )  # fmt: skip
            row["echo_requests_per_s"] = echo_cache[key].requests_per_s
    alone_cache: dict[tuple[str, str, int, int], dict[str, float]] = {}
    for row in rows:
        batch = max(1, round(row["mean_batch_size"]))
        key = (row["backend"], row["model"], row["side"], batch)
        if key not in alone_cache:
            alone_cache[key] = model_alone(
                row["backend"], row["model"], row["side"], batch, artifacts
            )
        row["model_alone_batch"] = batch
        row["model_alone_images_per_s"] = alone_cache[key]["images_per_s"]
        row["model_alone_p50_ms"] = alone_cache[key]["p50_ms"]
    with (out_dir / "results.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return rows


def _measure(
    scenario: Scenario, gateway: GatewayProcess, duration_s: float, warmup_s: float, processes: int
) -> dict[str, Any]:
    payload = _payload(scenario)
    check_request(gateway.grpc_target, payload)
    before = batch_sizes(gateway.metrics_url, scenario.model)
    result = run_load(
        LoadSpec(gateway.grpc_target, payload, scenario.items, duration_s, warmup_s,
                 scenario.concurrency, processes=processes)
    )  # fmt: skip
    formed = batch_sizes(gateway.metrics_url, scenario.model).minus(before)
    return {
        **asdict(scenario),
        **result.as_dict(),
        "mean_batch_size": formed.mean,
        "batch_size_buckets": formed.buckets,
        "gateway_rss_end_mb": gateway.rss_bytes() / 2**20,
    }


def machine_description() -> str:
    """CPU, cores, memory and library versions, for the report's header."""
    import onnxruntime
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}; {psutil.cpu_count()} logical cores; "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; Python {platform.python_version()}; "
        f"torch {torch.__version__}; onnxruntime {onnxruntime.__version__}; no GPU"
    )


def describe_spec(model: str) -> str:
    """The input shape a model takes, for table captions."""
    return get_spec(model).shape_text()
