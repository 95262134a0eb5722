"""Profile a real gateway under load with py-spy: the functions that hold the samples.

``cnnserve hotpath --out docs/bench/profiles`` starts ``cnnserve serve``,
drives it with the load generator and samples the gateway process and its children (the
decode processes) with ``py-spy record`` meanwhile. It writes ``<name>.txt`` (the functions
holding most samples, by self and inclusive time, with the throughput measured while
sampling) and ``<name>.collapsed``
(py-spy's raw stacks: ``flamegraph.pl``, speedscope or inferno draw them as a flame graph).
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .gateway_process import demo_repository, start_gateway
from .loadgen import LoadResult, LoadSpec, check_request, run_load
from .payloads import oip_request
from .suite import CLIENT_CHANNELS

#: Samples per second py-spy takes (its default is 100).
SAMPLE_RATE_HZ = 200
TOP = 40


@dataclass(frozen=True)
class Profile:
    """One profiled configuration."""

    name: str
    backend: str
    model: str
    side: int
    items: int
    concurrency: int
    payload: str
    env: tuple[tuple[str, str], ...] = ()


def top_functions(collapsed: str, top: int = TOP) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"samples: {total}", "", "self %   function"]
    lines += [f"{100 * n / total:6.1f}   {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive %   function"]
    lines += [f"{100 * n / total:6.1f}   {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"


def record(profile: Profile, artifacts: Path, out: Path, duration_s: float) -> LoadResult:
    """Load the gateway for ``duration_s`` while py-spy samples it; write both files."""
    # The virtual environment's own copy first: its bin/ need not be on PATH.
    beside = Path(sys.executable).with_name("py-spy")
    py_spy = str(beside) if beside.is_file() else shutil.which("py-spy")
    if py_spy is None:
        raise FileNotFoundError("py-spy is not installed; pip install 'cnnserve[dev]'")
    out.mkdir(parents=True, exist_ok=True)
    env = {
        "CNNSERVE_MODEL_REPOSITORY": str(demo_repository(artifacts)),
        "CNNSERVE_MAX_QUEUE_SIZE": "8192",
        "CNNSERVE_MAX_BATCH_SIZE": str(max(32, profile.items)),
        **dict(profile.env),
    }
    gateway = start_gateway(profile.backend, env, out / f"{profile.name}.gateway.log")
    try:
        request = oip_request(profile.model, profile.side, profile.items, profile.payload)
        check_request(gateway.grpc_target, request)
        warmup_s = 2.0
        collapsed = out / f"{profile.name}.collapsed"
        sampler = subprocess.Popen(
            # --subprocesses: the decode processes a PNG profile's batches are decoded in.
            [py_spy, "record", "--pid", str(gateway.process.pid), "--subprocesses", "--rate",
             str(SAMPLE_RATE_HZ), "--duration", str(round(duration_s)), "--format", "raw",
             "--output", str(collapsed), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        # The sampler starts after the 1.5 s client start-up and runs through the warm-up.
        time.sleep(0.5)
        result = run_load(
            LoadSpec(gateway.grpc_target, request, profile.items, duration_s, warmup_s,
                     profile.concurrency, processes=2, channels=CLIENT_CHANNELS)
        )  # fmt: skip
        sampler.wait(timeout=duration_s + 30)
    finally:
        gateway.stop()
    text = collapsed.read_text()
    loop = os.environ.get("CNNSERVE_EVENT_LOOP", "default (uvloop)")
    header = (
        f"{profile}\nevent loop: {loop}\n"
        f"measured while sampling: {result.requests_per_s:.0f} req/s, "
        f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, errors {result.errors}\n\n"
    )
    (out / f"{profile.name}.txt").write_text(header + top_functions(text))
    return result


PROFILES = {
    "ort-c1-tensor": Profile("ort-c1-tensor", "onnxruntime", "convnet", 28, 1, 1, "tensor"),
    "ort-c64-tensor": Profile("ort-c64-tensor", "onnxruntime", "convnet", 28, 1, 64, "tensor"),
    "ort-c4-32img": Profile("ort-c4-32img", "onnxruntime", "convnet", 28, 32, 4, "tensor"),
    "ort-c64-png": Profile("ort-c64-png", "onnxruntime", "convnet", 28, 1, 64, "png"),
}
