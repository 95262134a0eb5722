"""What the audit's image payloads, and the largest requests the memory budget accepts, cost a
real gateway: its peak RSS growth, CPU seconds and the answers.

Starts ``cnnserve serve --backend torchserve`` at the default settings in front of the stand-in
TorchServe the tests use (tests/gateway/null_torchserve.py: zeros of each model's output shape,
so the figures are the gateway's own, as in a deployment where the model runs in TorchServe's
pods), then sends each payload and reports its peak RSS (VmHWM, restarted per payload through
``/proc/<pid>/clear_refs``), CPU seconds and statuses. Run it inside a memory cgroup: the
gateway of older commits dies of the audit's last payload.

    .venv/bin/python tools/memory_probe.py            # every payload
    .venv/bin/python tools/memory_probe.py --audit    # the audit's payloads only
    .venv/bin/python tools/memory_probe.py --backend onnxruntime   # the model in the process

``--runners`` measures the in-process runners instead (the model's own working memory, which
``max_batch_model_bytes`` bounds): each artifact's batches, one fresh process each, and ONNX
Runtime's session as shipped, with its defaults and without the arena; ``--throughput``
times those sessions against each other in one process::

    .venv/bin/python tools/memory_probe.py --runners
    .venv/bin/python tools/memory_probe.py --throughput

Older code: a package tree of another commit, first on the path (the stand-in and the tests'
process helper still come from this checkout)::

    mkdir -p /tmp/old /tmp/oldpkg && git archive 04acb1f | tar -x -C /tmp/old
    cp -r /tmp/old/src/cnnserve /tmp/oldpkg/
    for d in models export handlers training gateway torchserve_engine protocol client bench
    do cp -r /tmp/old/$d /tmp/oldpkg/cnnserve/; done
    PYTHONPATH=/tmp/oldpkg .venv/bin/python tools/memory_probe.py --audit
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' stand-in TorchServe and process helper

from cnnserve.export.repository import ensure_default_repository  # noqa: E402
from cnnserve.protocol import open_inference_pb2 as pb  # noqa: E402
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc  # noqa: E402
from tests.gateway.memory_payloads import (  # noqa: E402
    BIG_CHANNEL,
    peak_rss,
    png,
    reset_peak,
    transparent_png,
)
from tests.gateway.memory_payloads import image_request as _request  # noqa: E402
from tests.gateway.null_torchserve import null_torchserve  # noqa: E402
from tests.support import GatewayProcess, gateway_process  # noqa: E402

MIB = 1 << 20


async def _call(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> str:
    try:
        await stub.ModelInfer(request, timeout=300)
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {(exc.details() or '')[:120]}"
    return "OK"


async def _payload(
    gateway: GatewayProcess, name: str, requests: list[pb.ModelInferRequest]
) -> bool:
    """Send ``requests`` at once and print what they cost; whether the gateway survived."""
    pid = gateway.process.pid
    process = psutil.Process(pid)
    before = reset_peak(pid)
    cpu_before = sum(process.cpu_times()[:2])
    seen = {"peak": 0, "cpu": cpu_before}

    async def watch() -> None:
        while True:
            seen["peak"] = max(seen["peak"], peak_rss(pid))
            with contextlib.suppress(psutil.Error):
                seen["cpu"] = sum(process.cpu_times()[:2])
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    started = time.monotonic()
    async with grpc.aio.insecure_channel(gateway.grpc_target, options=BIG_CHANNEL) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        outcomes = await asyncio.gather(*(_call(stub, r) for r in requests))
    await asyncio.sleep(0.2)
    watcher.cancel()
    wire = sum(r.ByteSize() for r in requests) / MIB
    print(f"{name}: {len(requests)} request(s), {wire:.2f} MiB sent")
    alive = gateway.process.poll() is None
    peak = peak_rss(pid) if alive else seen["peak"]
    state = "" if alive else f"; the gateway DIED (exit {gateway.process.returncode})"
    print(
        f"    peak RSS {peak / MIB:.0f} MiB (+{(peak - before) / MIB:.0f} MiB over "
        f"{before / MIB:.0f}), {seen['cpu'] - cpu_before:.2f} CPU s, "
        f"{time.monotonic() - started:.1f} s{state}"
    )
    for outcome in sorted(set(outcomes)):
        print(f"    {outcomes.count(outcome)} × {outcome}")
    return alive


async def _run(gateway: GatewayProcess, audit_only: bool) -> None:
    fcn = png(Image.new("RGB", (512, 512), (40, 40, 40)))
    small = [
        _request("convnet", [transparent_png(64)]),
        _request("fcn", [png(Image.new("RGB", (64, 64)))]),
    ]
    payloads = [
        ("warm-up: a digit and a 64² FCN image", small),
        (
            "one transparent 4096² PNG to the ConvNet",
            [_request("convnet", [transparent_png(4096)])],
        ),
        (
            "16 transparent 4096² PNGs to the ConvNet",
            [_request("convnet", [transparent_png(4096)] * 16)],
        ),
        ("256 identical 512² FCN PNGs in one request", [_request("fcn", [fcn] * 256)]),
    ]
    if not audit_only:
        worst = _request("fcn", [fcn] * 6, ("scores",))
        payloads += [
            (
                "256 transparent 1024² PNGs to the ConvNet",
                [_request("convnet", [transparent_png(1024)] * 256)],
            ),
            ("in-flight budget full: 6 × 512² FCN with scores, 4 at once", [worst] * 4),
            ("the next bigger request: 7 × 512² FCN", [_request("fcn", [fcn] * 7, ("scores",))]),
            ("6 × 512² FCN with scores, 8 at once", [worst] * 8),
        ]
    for name, requests in payloads:
        if not await _payload(gateway, name, requests):
            return


#: ONNX Runtime sessions compared by ``--runners``: as models/runtime.py opens them, with
#: ORT's defaults (memory patterns on), and without the CPU arena.
ORT_VARIANTS = ("shipped", "ort-defaults", "no-arena")
#: What ``--runners`` measures: (artifact format, model, image side, batch sizes).
RUNNER_CASES = [
    ("onnx", "fcn", 512, (1, 2, 4, 8)),
    ("torchscript", "fcn", 512, (1, 2, 4, 8)),
    ("onnx", "fcn", 256, (1, 4)),
    ("onnx", "convnet", 28, (32, 256)),
    ("torchscript", "convnet", 28, (32, 256)),
]


def _open(artifact_format: str, model: str, variant: str) -> Callable[[np.ndarray], np.ndarray]:
    """The batch function of ``model``'s repository artifact, one inference thread."""
    from cnnserve.models.runtime import load_runner

    suffix = "onnx" if artifact_format == "onnx" else "pt"
    path = ROOT / "model_repository" / model / "1" / f"model.{suffix}"
    if variant == "shipped":
        runner = load_runner(path, "onnx" if suffix == "onnx" else "torchscript", "cpu", threads=1)
        return runner.infer
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_cpu_mem_arena = variant != "no-arena"
    options.enable_mem_pattern = variant != "no-arena"
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {"input": batch})[0]


def _one_runner(artifact_format: str, model: str, side: int, count: int, variant: str) -> None:
    """In this (fresh) process: run one batch three times; print the RSS it grew by at its
    peak, after the first run and after all three, what it keeps, and the time a batch took."""
    if artifact_format == "torchscript":
        import torch

        torch.set_num_threads(1)
    infer = _open(artifact_format, model, variant)
    small = 28 if model == "convnet" else 32
    infer(np.zeros((1, 3, small, small), np.float32))  # the session's own first-run setup
    batch = np.random.default_rng(0).random((count, 3, side, side), np.float32)
    pid = psutil.Process().pid
    before = reset_peak(pid)
    infer(batch)
    first = peak_rss(pid) - before
    started = time.perf_counter()
    infer(batch)
    infer(batch)
    seconds = (time.perf_counter() - started) / 2
    kept = psutil.Process().memory_info().rss - before
    print(
        f"{artifact_format:11} {model:7} {side}² ×{count:<3} {variant:12} peak +{first / MIB:5.0f} "
        f"MiB, after 3 runs +{(peak_rss(pid) - before) / MIB:5.0f}, kept +{kept / MIB:5.0f}, "
        f"{seconds * 1000:6.0f} ms a batch",
        flush=True,
    )


def _runners() -> None:
    """Every :data:`RUNNER_CASES` batch (and ORT variant) in a process of its own."""
    for artifact_format, model, side, counts in RUNNER_CASES:
        variants = ORT_VARIANTS if artifact_format == "onnx" else ("shipped",)
        for count in counts:
            for variant in variants:
                args = ["--one-runner", artifact_format, model, str(side), str(count), variant]
                subprocess.run([sys.executable, __file__, *args], check=False)


def _throughput() -> None:
    """The ORT variants' time a batch, alternated in one process so that a shared machine's
    load falls on all alike; as ratios to the shipped session."""
    for model, shape, runs in [("fcn", (1, 3, 512, 512), 4), ("convnet", (256, 3, 28, 28), 30)]:
        infers = {variant: _open("onnx", model, variant) for variant in ORT_VARIANTS}
        batch = np.random.default_rng(0).random(shape, np.float32)
        spent = dict.fromkeys(ORT_VARIANTS, 0.0)
        for infer in infers.values():
            infer(batch)
        for run in range(runs):
            order = ORT_VARIANTS[run % 3 :] + ORT_VARIANTS[: run % 3]
            for variant in order:
                started = time.perf_counter()
                infers[variant](batch)
                spent[variant] += time.perf_counter() - started
        ratios = ", ".join(f"{v} {spent[v] / spent['shipped']:.2f}×" for v in ORT_VARIANTS)
        print(f"{model} {shape}: {spent['shipped'] / runs * 1000:.0f} ms a batch; {ratios}")


def main() -> None:
    """Start the stand-in and the gateway, send the payloads (or measure the runners)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audit", action="store_true", help="the audit's payloads only")
    parser.add_argument(
        "--runners", action="store_true", help="the in-process runners' own memory per batch"
    )
    parser.add_argument("--throughput", action="store_true", help="ORT session variants' speed")
    parser.add_argument("--one-runner", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument(
        "--backend",
        choices=("torchserve", "onnxruntime", "torchscript"),
        default="torchserve",
        help="the gateway's backend: torchserve (the stand-in), or the model in its process",
    )
    args = parser.parse_args()
    if args.one_runner:
        artifact_format, model, side, count, variant = args.one_runner
        _one_runner(artifact_format, model, int(side), int(count), variant)
        return
    if args.runners or args.throughput:
        if args.runners:
            _runners()
        else:
            _throughput()
        return
    work = Path(tempfile.mkdtemp(prefix="memory_probe-"))
    ensure_default_repository(work / "repository")
    with contextlib.ExitStack() as stack:
        settings: dict[str, Any] = {"model_repository": work / "repository"}
        if args.backend == "torchserve":
            settings |= {
                "torchserve_grpc_target": stack.enter_context(null_torchserve()),
                "torchserve_token_auth": False,
                "torchserve_registration": False,
                "model_store_dir": work / "store",
            }
        log = work / "gateway.log"
        gateway = stack.enter_context(gateway_process(args.backend, log, **settings))
        asyncio.run(_run(gateway, args.audit))


if __name__ == "__main__":
    main()
