"""What the feature maps cost: the artifacts' sizes, a plain request's latency, and a request
for feature maps' latency (docs/feature-maps.md, "Costs").

Exports the default repository with the exporter on the path into a temporary folder, starts
the data plane over an in-process backend at the default settings, and sends one request at a
time (a lone caller: no batching delay), timing each from the call to the answer:

- ``convnet``: one FP32 ``[1,3,28,28]`` digit asking ``logits``; then asking each map;
- ``fcn``: one FP32 ``[1,3,64,64]`` scene asking ``mask``; then asking each map.

    .venv/bin/python tools/feature_costs.py
    .venv/bin/python tools/feature_costs.py --backend torchscript

``--memory SIDE`` measures instead what one FCN item of SIDE×SIDE takes ONNX Runtime: the
peak RSS growth of one run of the plain artifact, of the feature artifact fetching ``conv1``
only, and fetching every map, each in a fresh process::

    .venv/bin/python tools/feature_costs.py --memory 512

``--repository DIR`` serves a repository exported before instead (``cnnserve export --name
convnet --repository DIR`` ...; the figures to compare: nothing else ran in the process).

Older code (no feature maps: the plain rows only), as tools/memory_probe.py runs it::

    mkdir -p /tmp/old /tmp/oldpkg && git archive <commit> | tar -x -C /tmp/old
    cp -r /tmp/old/src/cnnserve /tmp/oldpkg/
    for d in models export handlers training gateway torchserve_engine protocol client bench
    do cp -r /tmp/old/$d /tmp/oldpkg/cnnserve/; done
    PYTHONPATH=/tmp/oldpkg .venv/bin/python tools/feature_costs.py
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from cnnserve.export.repository import ensure_default_repository
from cnnserve.gateway.dataplane import DataPlane, create_core
from cnnserve.protocol.domain import InferRequest, RequestedOutput, Tensor
from cnnserve.settings import Settings

#: Each model's input side and the plain output a request asks for.
CASES = {"convnet": (28, "logits"), "fcn": (64, "mask")}


def sizes(repository: Path) -> None:
    """Every file of each version, in bytes."""
    for path in sorted(repository.glob("*/1/model*")):
        print(f"{path.parent.parent.name:8} {path.name:22} {path.stat().st_size:>12,} bytes")


async def timed(core: DataPlane, request: InferRequest, count: int) -> tuple[float, float]:
    """Median and 90th percentile of ``count`` calls, in ms, after 20 unmeasured ones."""
    for _ in range(20):
        await core.infer(request)
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        await core.infer(request)
        seconds.append(time.perf_counter() - started)
    cuts = statistics.quantiles(seconds, n=10)
    return statistics.median(seconds) * 1000, cuts[-1] * 1000


async def measure(repository: Path, backend: str, count: int) -> None:
    """Time each model's plain output, then each of its feature maps."""
    settings = Settings(model_repository=repository, backend=backend, device="cpu")
    core = await create_core(settings)
    await core.start()
    try:
        for model, (side, plain) in CASES.items():
            x = np.random.default_rng(0).uniform(-1, 1, (1, 3, side, side)).astype(np.float32)
            tensor = Tensor("input", "FP32", x.shape, x)
            offered = [t.name for t in core.model_metadata(model).outputs]
            for output in (plain, *offered[3:]):
                request = InferRequest(model, [tensor], [RequestedOutput(output)])
                median, p90 = await timed(core, request, count)
                print(f"{model:8} {output:10} median {median:7.3f} ms   p90 {p90:7.3f} ms")
    finally:
        await core.stop(5.0)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_growth(path: str, side: int, layers: tuple[str, ...] | None) -> int:
    """Peak RSS growth, in MiB, of one run of the FCN artifact at ``path`` on one item
    (``layers``: through the feature artifact, fetching those maps)."""
    from cnnserve.models.runtime import OnnxRunner

    runner = OnnxRunner(Path(path), device="cpu")
    x = np.zeros((1, 3, side, side), np.float32)
    if layers is not None:
        runner.infer_features(np.zeros((1, 3, 9, 9), np.float32), layers)  # opens the session
    before = _status_kib("VmRSS")
    if layers is None:
        runner.infer(x)
    else:
        runner.infer_features(x, layers)
    return (_status_kib("VmHWM") - before) // 1024


def memory(repository: Path, side: int) -> None:
    """Print :func:`_peak_growth` of the plain run, one map and every map."""
    path = str(repository / "fcn" / "1" / "model.onnx")
    every = ("conv1", "conv2", "conv3", "unsample1", "unsample2")
    context = multiprocessing.get_context("spawn")
    for label, layers in (("plain", None), ("conv1", ("conv1",)), ("every map", every)):
        with context.Pool(1) as pool:
            growth = pool.apply(_peak_growth, (path, side, layers))
        print(f"fcn {side}×{side} {label:10} peak RSS growth {growth:,} MiB")


def main() -> None:
    """Export, list the sizes, time the requests."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["onnxruntime", "torchscript"], default="onnxruntime")
    parser.add_argument("--count", type=int, default=300, help="timed calls per output")
    parser.add_argument("--memory", type=int, metavar="SIDE", help="measure memory instead")
    parser.add_argument(
        "--repository", type=Path, help="serve this repository, exported before (default: export)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="feature-costs-") as scratch:
        repository = args.repository or Path(scratch)
        if args.repository is None:
            # The export's own sessions and threads are gone before anything is timed only
            # in another process: pass --repository for figures to compare.
            ensure_default_repository(repository)
        if args.memory:
            memory(repository, args.memory)
            return
        sizes(repository)
        asyncio.run(measure(repository, args.backend, args.count))


if __name__ == "__main__":
    main()
