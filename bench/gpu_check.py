"""GPU check: the torchscript path on a CUDA device, one JSON line per figure.

``cnnserve gpu-check --out DIR`` (or ``bench/gpu.sh DIR`` where cnnserve is not installed)
measures, in a few minutes on an NVIDIA host:

1. the model alone on the device — ConvNet at batch 1…1024 and the FCN at 128×128 — in each
   configuration of the GPU path: eager fp32, ``channels_last``, fp16, fp16 with CUDA graphs,
   and the latter fed uint8 pixels normalized on the device (the figures include the copies
   to and from the GPU, as serving does);
2. a real gateway (``cnnserve serve --backend torchscript``, fp16, CUDA graphs) under load
   from several client processes: single-image requests (FP32 and UINT8) and 256-image UINT8
   requests, beside a bare gRPC echo of the single image; then the PNG path end to end —
   PNG digits in (1 and 32 per request, the ``image`` input), decoded and prepared in the
   gateway, the formed batch run on the GPU.

Each figure is printed as one JSON line and appended to ``DIR/gpu_check.jsonl``;
``DIR/gpu_check.md`` has the tables. ``--dry-run`` runs the same code on the CPU at tiny sizes
in seconds (CI checks the script this way); configurations that need CUDA are reported as
skipped. The model-alone phase needs torch and numpy only; the gateway phase needs
cnnserve's dependencies and is reported as skipped, with the missing modules, without them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnserve.models.torchscript import TorchScriptRunner

#: Modules the gateway phase needs beyond torch and numpy.
GATEWAY_MODULES = (
    "grpc", "grpc_health", "grpc_reflection", "google.protobuf", "fastapi", "uvicorn",
    "starlette", "pydantic_settings", "prometheus_client", "typer", "PIL", "httpx", "psutil",
    "uvloop", "sklearn", "onnxruntime",
)  # fmt: skip

Figure = dict[str, Any]


@dataclass(frozen=True)
class Variant:
    """One configuration of the torchscript runner."""

    name: str
    channels_last: bool
    half: bool
    cuda_graphs: bool
    pixels: bool  # uint8 input normalized on the device (else float32)

    @property
    def needs_cuda(self) -> bool:
        """fp16 and CUDA graphs exist on a GPU only."""
        return self.half or self.cuda_graphs


VARIANTS = (
    Variant("eager fp32", channels_last=False, half=False, cuda_graphs=False, pixels=False),
    Variant("channels_last fp32", channels_last=True, half=False, cuda_graphs=False, pixels=False),
    Variant("channels_last fp16", channels_last=True, half=True, cuda_graphs=False, pixels=False),
    Variant("fp16 + CUDA graphs", channels_last=True, half=True, cuda_graphs=True, pixels=False),
    Variant("fp16 + CUDA graphs, uint8 in", channels_last=True, half=True, cuda_graphs=True,
            pixels=True),
    Variant("channels_last fp32, uint8 in", channels_last=True, half=False, cuda_graphs=False,
            pixels=True),
)  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """Sizes and durations: the real check, or a dry run on the CPU."""

    device: str
    convnet_batches: tuple[int, ...]
    fcn_batches: tuple[int, ...]
    fcn_side: int
    seconds_per_point: float
    gateway_seconds: float
    warmup_s: float
    client_processes: int
    single_concurrency: int
    big_items: int
    big_concurrency: int
    png_items: int
    graph_buckets: tuple[int, ...]

    @classmethod
    def for_run(cls, dry_run: bool) -> Plan:
        """The plan for a GPU run, or the tiny CPU one."""
        if dry_run:
            return cls("cpu", (1, 4), (1, 2), 16, 0.2, 0.5, 0.2, 1, 2, 4, 2, 3, (1, 2, 4))
        return cls(
            "cuda:0", (1, 8, 32, 128, 256, 1024), (1, 8, 32), 128, 0.5, 10.0, 2.0, 8, 256,
            256, 8, 32, (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )  # fmt: skip


class Recorder:
    """Prints each figure as a JSON line and keeps them for the Markdown."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "gpu_check.jsonl"
        self.path.write_text("")
        self.figures: list[Figure] = []

    def add(self, **figure: Any) -> None:
        """Record one figure."""
        line = json.dumps(figure)
        print(line, flush=True)
        with self.path.open("a") as handle:
            handle.write(line + "\n")
        self.figures.append(figure)


def describe_machine(device: str) -> Figure:
    """The device, torch and Python in use."""
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor()
    return {
        "phase": "machine",
        "device": device,
        "device_name": name or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def model_alone(plan: Plan, artifacts: Path, recorder: Recorder) -> None:
    """Phase 1: every variant at every batch size, ConvNet then FCN."""
    on_cuda = plan.device.startswith("cuda")
    for model, side, batches in (
        ("convnet", 28, plan.convnet_batches),
        ("fcn", plan.fcn_side, plan.fcn_batches),
    ):
        for variant in VARIANTS:
            where = {"phase": "model", "model": model, "side": side, "variant": variant.name}
            if variant.needs_cuda and not on_cuda:
                recorder.add(**where, skipped="needs CUDA")
                continue
            runner = TorchScriptRunner(
                artifacts / f"{model}.pt",
                plan.device,
                half=variant.half,
                channels_last=variant.channels_last,
                pinned_memory=True,
                cuda_graph_batch_sizes=plan.graph_buckets if variant.cuda_graphs else (),
            )
            for batch in batches:
                images_per_s, p50_ms = _time_runner(runner, variant, batch, side, plan)
                recorder.add(
                    **where, batch=batch, images_per_s=round(images_per_s, 1),
                    p50_ms=round(p50_ms, 4), device=runner.device,
                )  # fmt: skip
            del runner
            if on_cuda:
                torch.cuda.empty_cache()


def _time_runner(
    runner: TorchScriptRunner, variant: Variant, batch: int, side: int, plan: Plan
) -> tuple[float, float]:
    """Images/s from the median call and that median in ms (a call includes both copies)."""
    rng = np.random.default_rng(batch)
    if variant.pixels:
        x = rng.integers(0, 256, (batch, 3, side, side), dtype=np.uint8)
    else:
        x = rng.uniform(-1, 1, (batch, 3, side, side)).astype(np.float32)
    for _ in range(3):  # includes the CUDA graph capture for this bucket
        runner.infer(x)
    times: list[float] = []
    stop = time.perf_counter() + plan.seconds_per_point
    while time.perf_counter() < stop or len(times) < 3:
        started = time.perf_counter()
        runner.infer(x)
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return batch / median, median * 1000


def missing_gateway_modules() -> list[str]:
    """Modules the gateway phase needs that this Python cannot import."""
    missing = []
    for name in GATEWAY_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


def gateway_under_load(plan: Plan, artifacts: Path, out: Path, recorder: Recorder) -> None:
    """Phase 2: a real gateway on the device under load, and the echo of a single image."""
    missing = missing_gateway_modules()
    if missing:
        recorder.add(
            phase="gateway", skipped=f"missing modules: {', '.join(missing)}; install "
            "cnnserve's dependencies (pip install -e .) to measure the gateway",
        )  # fmt: skip
        return
    from .gateway_process import demo_repository, start_gateway
    from .loadgen import LoadSpec, check_request, infer_request, run_load
    from .payloads import oip_request
    from .scrape import batch_sizes, gpu_memory_used_bytes

    on_cuda = plan.device.startswith("cuda")
    env = {
        "CNNSERVE_MODEL_REPOSITORY": str(demo_repository(artifacts)),
        "CNNSERVE_DEVICE": plan.device,
        "CNNSERVE_HALF_PRECISION": str(on_cuda).lower(),
        "CNNSERVE_CUDA_GRAPH_BATCH_SIZES": json.dumps(list(plan.graph_buckets)),
        "CNNSERVE_MAX_BATCH_SIZE": str(max(plan.graph_buckets)),
        "CNNSERVE_MAX_ITEMS_PER_REQUEST": str(max(plan.big_items, plan.png_items, 1)),
        "CNNSERVE_MAX_QUEUE_SIZE": "65536",
    }
    rng = np.random.default_rng(0)
    pixels_1 = rng.integers(0, 256, (1, 3, 28, 28), dtype=np.uint8)
    loads = (
        ("1-image FP32", infer_request("convnet", (pixels_1 / 127.5 - 1).astype(np.float32)),
         1, plan.single_concurrency),
        ("1-image UINT8", infer_request("convnet", pixels_1, input_name="pixels"), 1,
         plan.single_concurrency),
        (f"{plan.big_items}-image UINT8",
         infer_request("convnet", rng.integers(0, 256, (plan.big_items, 3, 28, 28), np.uint8),
                       input_name="pixels"), plan.big_items, plan.big_concurrency),
        # The PNG path: encoded digits in, decoded where the gateway decodes them, the formed
        # batch on the GPU — what an application sending images gets end to end.
        ("1-image PNG", oip_request("convnet", 28, 1, "png"), 1, plan.single_concurrency),
        (f"{plan.png_items}-image PNG", oip_request("convnet", 28, plan.png_items, "png"),
         plan.png_items, plan.big_concurrency),
    )  # fmt: skip
    gateway = start_gateway("torchscript", env, out / "gpu_check.gateway.log")
    try:
        for name, request, items, concurrency in loads:
            check_request(gateway.grpc_target, request)
            before = batch_sizes(gateway.metrics_url, "convnet")
            result = run_load(
                LoadSpec(gateway.grpc_target, request, items, plan.gateway_seconds,
                         plan.warmup_s, concurrency, processes=plan.client_processes)
            )  # fmt: skip
            formed = batch_sizes(gateway.metrics_url, "convnet").minus(before)
            # NVML's reading through the gateway's own metrics (null without NVML or a GPU).
            gpu_memory = gpu_memory_used_bytes(gateway.metrics_url)
            recorder.add(
                phase="gateway", load=name, concurrency=concurrency,
                requests_per_s=round(result.requests_per_s, 1),
                images_per_s=round(result.images_per_s, 1), p50_ms=round(result.p50_ms, 3),
                p99_ms=round(result.p99_ms, 3), mean_batch_size=round(formed.mean, 2),
                errors=result.errors, gateway_rss_mb=round(gateway.rss_bytes() / 2**20),
                gpu_memory_used_mb=None if gpu_memory is None else round(gpu_memory / 2**20),
            )  # fmt: skip
    finally:
        gateway.stop()
    with _echo(plan) as target:
        result = run_load(
            LoadSpec(target, loads[0][1], 1, plan.gateway_seconds, plan.warmup_s,
                     plan.single_concurrency, processes=plan.client_processes)
        )  # fmt: skip
    recorder.add(
        phase="echo", load="1-image FP32", concurrency=plan.single_concurrency,
        requests_per_s=round(result.requests_per_s, 1), p50_ms=round(result.p50_ms, 3),
        p99_ms=round(result.p99_ms, 3),
    )  # fmt: skip


@contextmanager
def _echo(plan: Plan) -> Iterator[str]:
    from .suite import echo_server

    with echo_server("uvloop") as target:
        yield target


def markdown(figures: list[Figure], command: str) -> str:
    """The tables: model alone (img/s by variant × batch) and the gateway under load."""
    machine = next((f for f in figures if f["phase"] == "machine"), {})
    lines = [
        "# GPU check",
        "",
        f"Device: {machine.get('device_name')} ({machine.get('device')}); torch "
        f"{machine.get('torch')}, CUDA {machine.get('cuda')}, Python {machine.get('python')}.",
        f"Produced by `{command}`.",
        "",
    ]
    for model in ("convnet", "fcn"):
        rows = [f for f in figures if f["phase"] == "model" and f["model"] == model]
        if not rows:
            continue
        batches = sorted({f["batch"] for f in rows if "batch" in f})
        lines += [
            f"## {model} alone ({rows[0]['side']}×{rows[0]['side']}), images/s (p50 ms)",
            "",
            "| variant | " + " | ".join(f"batch {b}" for b in batches) + " |",
            "|" + " --- |" * (1 + len(batches)),
        ]
        for variant in dict.fromkeys(f["variant"] for f in rows):
            mine = {f.get("batch"): f for f in rows if f["variant"] == variant}
            if None in mine:
                cells = [mine[None]["skipped"]] * len(batches)
            else:
                cells = [
                    f"{mine[b]['images_per_s']:.0f} ({mine[b]['p50_ms']:.3f})" if b in mine else "—"
                    for b in batches
                ]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Gateway under load (torchscript backend)", ""]
    gateway = [f for f in figures if f["phase"] in ("gateway", "echo")]
    skipped = [f for f in gateway if "skipped" in f]
    if skipped:
        lines += [f"Skipped: {skipped[0]['skipped']}.", ""]
    else:
        lines += [
            "| load | conc. | req/s | img/s | p50 ms | p99 ms | mean batch | errors |",
            "|" + " --- |" * 8,
        ]
        for f in gateway:
            name = f"{f['load']} (bare gRPC echo)" if f["phase"] == "echo" else f["load"]
            lines.append(
                f"| {name} | {f['concurrency']} | {f['requests_per_s']:.0f} | "
                f"{f.get('images_per_s', f['requests_per_s']):.0f} | {f['p50_ms']:.2f} | "
                f"{f['p99_ms']:.2f} | {f.get('mean_batch_size', '—')} | "
                f"{f.get('errors') or 0} |"
            )
        lines.append("")
    return "\n".join(lines)


class GpuCheckError(Exception):
    """The check cannot run here (no CUDA device, no exported models); the message says why."""


def run_check(out: Path, artifacts: Path, dry_run: bool, skip_gateway: bool, command: str) -> None:
    """Run both phases (or the model alone) into ``out``; ``command`` is how the run was asked
    for, written into the report."""
    plan = Plan.for_run(dry_run)
    if dry_run:
        torch.set_num_threads(1)  # as the gateway's default inference_threads on a CPU
    if plan.device.startswith("cuda") and not torch.cuda.is_available():
        raise GpuCheckError("no CUDA device visible to torch; use --dry-run to check the script")
    missing = [m for m in ("convnet", "fcn") if not (artifacts / f"{m}.pt").is_file()]
    if missing:
        raise GpuCheckError(
            f"{', '.join(f'{m}.pt' for m in missing)} not in {artifacts}: export them "
            "first (make export, or cnnserve export <model> --out DIR) and pass --artifacts"
        )
    recorder = Recorder(out)
    recorder.add(**describe_machine(plan.device))
    model_alone(plan, artifacts, recorder)
    if not skip_gateway:
        gateway_under_load(plan, artifacts, out, recorder)
    (out / "gpu_check.md").write_text(markdown(recorder.figures, command))


def main() -> None:
    """bench/gpu.sh's entry: a GPU host without cnnserve installed has no ``cnnserve`` command
    (nor typer) to run ``cnnserve gpu-check`` with."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the figures")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny sizes, seconds (checks the script)"
    )
    parser.add_argument("--skip-gateway", action="store_true", help="model alone only")
    args = parser.parse_args()
    command = " ".join(
        ["python -m cnnserve.bench.gpu_check", *(shlex.quote(a) for a in sys.argv[1:])]
    )
    try:
        run_check(args.out, args.artifacts, args.dry_run, args.skip_gateway, command)
    except GpuCheckError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
