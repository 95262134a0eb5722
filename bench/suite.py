"""The benchmark suite: scenarios against real gateway processes, baselines, and the report.

Every figure comes from one run on one machine, so ratios between them are meaningful even on
a noisy shared host. Each scenario's gateway is compared with three baselines measured in the
same run:

(a) the compute ceiling — the model alone (same runner, same options) at the batch size the
    batcher formed, measured right after the scenario while the idle gateway still runs (the
    fastest of three windows: other tenants only ever slow a window down);
(b) the RPC ceiling — a bare ``grpc.aio`` echo of the same payload at the same concurrency
    (one process, on the gateway's kind of event loop);
(c) TorchServe alone — its REST API with its own batching, fed PNG digits by HTTP clients,
    with 1 and with 2 workers per model (its baseline is the better of the two).

The headline points are measured a second time by Triton's perf_analyzer against the same
gateway (:mod:`.perf_analyzer`), an independent load generator beside the project's own.

Batching **off** means ``max_batch_size`` equal to the items per request and a delay of 0:
the batcher then never merges two requests, so every request is one model call.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from cnnserve.models.runtime import ARTIFACT_SUFFIX, ArtifactFormat, Runner, load_runner
from cnnserve.settings import Settings

from .echo import serve_echo_forever
from .gateway_process import GatewayProcess, demo_repository, free_ports, start_gateway
from .loadgen import LoadResult, LoadSpec, check_http_request, check_request, run_load
from .payloads import oip_request, oip_rest_request, predict_request, rest_request, tensor_items
from .perf_analyzer import run_perf_analyzer
from .report import INDEPENDENT, SHARED_BATCHER, TORCHSERVE_REST
from .scrape import batch_sizes
from .torchserve_run import TorchServeRun, running_torchserve

logger = logging.getLogger(__name__)

#: The in-process format each backend's model runs as (TorchServe's handlers run TorchScript).
BACKEND_FORMAT: dict[str, ArtifactFormat] = {
    "onnxruntime": "onnx",
    "torchscript": "torchscript",
    "torchserve": "torchscript",
    "torchserve_rest": "torchscript",
}
#: Backends a gateway serves; ``torchserve_rest`` is baseline (c), TorchServe without it.
GATEWAY_BACKENDS = ("onnxruntime", "torchscript", "torchserve")
#: Largest batch with batching on (the gateway's default) — also TorchServe's own batch size
#: in baseline (c), whose delay is TorchServe's default in cnnserve's settings.
BATCHING_MAX_BATCH_SIZE = 32
TORCHSERVE_REST_DELAY_MS = 5
#: Seconds the model-alone baseline runs per row, in this many windows.
MODEL_ALONE_S = 3.0
MODEL_ALONE_WINDOWS = 3

Overrides = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Scenario:
    """One measured point; ``variant`` names ``overrides`` of the gateway's settings (of
    TorchServe's, for TorchServe alone).

    ``transport``: ``grpc`` (OIP ModelInfer), ``rest`` (OIP REST with the binary tensor
    extension) or ``predict`` (the friendly ``POST /predict/<model>``, a PNG body).
    ``client``: the project's load generator (``loadgen``) or Triton's ``perf_analyzer``.
    """

    backend: str
    model: str
    side: int
    items: int
    concurrency: int
    batching: bool
    payload: str = "tensor"
    variant: str = ""
    overrides: Overrides = field(default=())
    transport: str = "grpc"
    client: str = "loadgen"

    @property
    def label(self) -> str:
        """Short human-readable name."""
        mode = "batching" if self.batching else "no-batching"
        extra = f"/{self.variant}" if self.variant else ""
        via = "" if self.transport == "grpc" else f"/{self.transport}"
        by = "" if self.client == "loadgen" else f"/{self.client}"
        return (
            f"{self.backend}/{self.model}@{self.side}/{self.items}img-{self.payload}{via}/"
            f"c{self.concurrency}/{mode}{extra}{by}"
        )

    def gateway_env(self) -> dict[str, str]:
        """The gateway's ``CNNSERVE_*`` settings for this scenario (artifacts aside)."""
        if self.batching:
            env = {"CNNSERVE_MAX_BATCH_SIZE": str(max(BATCHING_MAX_BATCH_SIZE, self.items))}
        else:
            env = {
                "CNNSERVE_MAX_BATCH_SIZE": str(self.items),
                "CNNSERVE_MAX_BATCH_DELAY_MS": "0",
            }
        env["CNNSERVE_MAX_QUEUE_SIZE"] = "8192"
        env.update({f"CNNSERVE_{key.upper()}": value for key, value in self.overrides})
        return env

    @property
    def torchserve_workers(self) -> int:
        """Worker processes per model of TorchServe alone (its ``overrides`` may say)."""
        return int(dict(self.overrides).get(TORCHSERVE_WORKERS, "1"))


#: Delay trade-off variants (ORT ConvNet, single images): the default is adaptive with 2 ms.
DELAY_VARIANTS: tuple[tuple[str, Overrides], ...] = (
    ("delay 0", (("max_batch_delay_ms", "0"),)),
    ("fixed 2 ms", (("max_batch_delay_ms", "2"), ("adaptive_batch_delay", "false"))),
    ("adaptive 5 ms", (("max_batch_delay_ms", "5"),)),
)
#: Two frontend processes sharing the port (SO_REUSEPORT), at the default delay: feeding one
#: batching process (the default), or as two independent gateways, each with its own batcher.
PROCESS_VARIANTS: tuple[tuple[str, Overrides], ...] = (
    (SHARED_BATCHER, (("gateway_processes", "2"), ("shared_batcher", "true"))),
    (INDEPENDENT, (("gateway_processes", "2"), ("shared_batcher", "false"))),
)
#: TorchServe alone with 1 and 2 workers per model: its baseline is the better of the two.
TORCHSERVE_WORKERS = "torchserve_workers_per_model"
TORCHSERVE_WORKER_VARIANTS: tuple[tuple[str, Overrides], ...] = tuple(
    (f"{n} worker{'s' if n > 1 else ''}", ((TORCHSERVE_WORKERS, str(n)),)) for n in (1, 2)
)
#: gRPC connections per client process, so a gateway of several processes gets load on each.
CLIENT_CHANNELS = 4


def profile(name: str, backends: Iterable[str]) -> list[Scenario]:
    """The scenario list: ``quick`` (minutes; every target once) or ``full`` (the matrix)."""
    backends = list(backends)
    if name == "quick":
        return _quick(backends)
    if name == "full":
        return _full(backends)
    raise ValueError(f"unknown profile {name!r}; use quick or full")


def _variants(
    backend: str, variants: Iterable[tuple[str, Overrides]], concurrencies: Iterable[int]
) -> list[Scenario]:
    """1-image ConvNet tensor scenarios of each variant at each concurrency."""
    concurrencies = list(concurrencies)
    return [
        Scenario(backend, "convnet", 28, 1, c, True, variant=variant, overrides=overrides)
        for variant, overrides in variants
        for c in concurrencies
    ]


def _torchserve_alone(concurrencies: Iterable[int]) -> list[Scenario]:
    """TorchServe's REST API alone, fed PNG digits, with each worker count."""
    concurrencies = list(concurrencies)
    return [
        Scenario(TORCHSERVE_REST, "convnet", 28, 1, c, True, payload="png", variant=variant,
                 overrides=overrides)
        for variant, overrides in TORCHSERVE_WORKER_VARIANTS
        for c in concurrencies
    ]  # fmt: skip


def _perf_analyzer(backend: str) -> list[Scenario]:
    """The headline points again, measured by perf_analyzer against the same gateway."""
    return [
        Scenario(backend, "convnet", 28, items, c, True, client="perf_analyzer")
        for items, c in ((1, 1), (1, 64), (32, 4))
    ]


def _quick(backends: list[str]) -> list[Scenario]:
    """Every target once, the batching-delay and frontend-process trade-offs, and the
    perf_analyzer rows; nothing else (the full profile has the rest)."""
    out: list[Scenario] = []
    for backend in backends:
        if backend == "onnxruntime":
            out += [Scenario(backend, "convnet", 28, 1, c, True) for c in (1, 8, 64)]
            out.append(Scenario(backend, "convnet", 28, 1, 64, True, payload="png"))
            out.append(Scenario(backend, "convnet", 28, 1, 64, True, transport="rest"))
            out.append(
                Scenario(backend, "convnet", 28, 1, 64, True, payload="png", transport="predict")
            )
            out.append(Scenario(backend, "convnet", 28, 32, 4, True))
            out += _variants(backend, DELAY_VARIANTS, (1, 8, 64))
            out += _variants(backend, PROCESS_VARIANTS, (8, 64))
            out += _perf_analyzer(backend)
        elif backend == "torchserve":
            out.append(Scenario(backend, "convnet", 28, 1, 64, True))
            out.append(Scenario(backend, "convnet", 28, 1, 64, True, payload="png"))
            out.append(
                Scenario(backend, "convnet", 28, 1, 64, True, payload="png", transport="predict")
            )
            out += _torchserve_alone((64,))
    return out


def _full(backends: list[str]) -> list[Scenario]:
    out: list[Scenario] = []
    for backend in backends:
        for batching in (True, False):
            for items in (1, 32):
                out += [
                    Scenario(backend, "convnet", 28, items, c, batching)
                    for c in (1, 8, 32, 64, 128)
                ]
            # FCN work grows with the side squared: 32-image requests only at 28×28, and the
            # largest sides at moderate concurrency, or one request outlives its deadline.
            out += [Scenario(backend, "fcn", 28, 32, c, batching) for c in (1, 8)]
            for side in (28, 128, 256):
                out += [Scenario(backend, "fcn", side, 1, c, batching) for c in (1, 8, 32)]
        if backend != "torchserve":
            out += [Scenario(backend, "convnet", 28, 1, c, True, payload="png") for c in (1, 64)]
            out += [Scenario(backend, "convnet", 28, 1, c, True, transport="rest") for c in (1, 64)]
        if backend == "onnxruntime":
            out += _variants(backend, (*DELAY_VARIANTS, *PROCESS_VARIANTS), (1, 8, 32, 64, 128))
            out += _perf_analyzer(backend)
        if backend == "torchserve":
            out += [Scenario(backend, "convnet", 28, 1, c, True, payload="png") for c in (1, 8, 64)]
            out += [
                Scenario(backend, "convnet", 28, 1, c, True, payload="png", transport="predict")
                for c in (1, 64)
            ]
            out += _torchserve_alone((1, 8, 32, 64, 128))
    return out


@contextmanager
def echo_server(event_loop: str) -> Iterator[str]:
    """A bare gRPC echo server in its own process; yields its target."""
    (port,) = free_ports(1)
    process = multiprocessing.get_context("spawn").Process(
        target=serve_echo_forever, args=("127.0.0.1", port, event_loop), daemon=True
    )
    process.start()
    target = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                check_request(target, oip_request("echo", 7, 1, "tensor"), 2)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield target
    finally:
        process.kill()
        process.join()


class ModelAlone:
    """Baseline (a): the backend's runner alone, loaded once per format and model."""

    def __init__(self, artifacts: Path, settings: Settings) -> None:
        self._artifacts = artifacts
        self._settings = settings
        self._runners: dict[tuple[ArtifactFormat, str], Runner] = {}
        if settings.inference_threads:
            # As the gateway and TorchServe's workers do: torch's count is process-wide.
            torch.set_num_threads(settings.inference_threads)

    def measure(
        self, backend: str, model: str, side: int, batch: int, seconds: float = MODEL_ALONE_S
    ) -> dict[str, float]:
        """Images/s and p50 ms of one batch: the best median of a few windows.

        A ceiling is what the model alone can do: on a shared host another tenant's burst
        only ever slows a window down, so the fastest window's median is the robust figure.
        """
        fmt = BACKEND_FORMAT[backend]
        runner = self._runner(fmt, model)
        x = tensor_items(batch, side)
        for _ in range(3):
            runner.infer(x)
        medians = []
        for _ in range(MODEL_ALONE_WINDOWS):
            times: list[float] = []
            stop = time.perf_counter() + seconds / MODEL_ALONE_WINDOWS
            while time.perf_counter() < stop or len(times) < 3:
                started = time.perf_counter()
                runner.infer(x)
                times.append(time.perf_counter() - started)
            medians.append(statistics.median(times))
        best = min(medians)
        return {"images_per_s": batch / best, "p50_ms": best * 1000}

    def _runner(self, fmt: ArtifactFormat, model: str) -> Runner:
        key = (fmt, model)
        if key not in self._runners:
            s = self._settings
            self._runners[key] = load_runner(
                self._artifacts / f"{model}{ARTIFACT_SUFFIX[fmt]}",
                fmt,
                device="cpu",
                threads=s.inference_threads,
                channels_last=s.channels_last,
            )
        return self._runners[key]


@dataclass
class _Context:
    artifacts: Path
    out_dir: Path
    duration_s: float
    warmup_s: float
    processes: int
    alone: ModelAlone
    rows: list[dict[str, Any]] = field(default_factory=list)


def run_suite(
    scenarios: list[Scenario],
    artifacts: Path,
    out_dir: Path,
    duration_s: float,
    warmup_s: float,
    processes: int,
) -> list[dict[str, Any]]:
    """Run every scenario and its baselines, side by side; return the rows.

    Every server is started first — one gateway process per distinct configuration, the
    TorchServes, the echo — and left idle while not measured. Scenarios are then measured
    in an order that puts comparable ones next to each other (same model, size, items and
    concurrency: batching on and off, each variant, TorchServe with and without the
    gateway), each followed by its model-alone and echo baselines, so a slow minute on a
    shared host hits both sides of a ratio. Rows are appended to ``out_dir/results.jsonl``
    as they are measured.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.jsonl").write_text("")
    ctx = _Context(
        artifacts, out_dir, duration_s, warmup_s, processes, ModelAlone(artifacts, Settings())
    )
    with ExitStack() as stack:
        # TorchServe's model stores and logs are scratch, not part of the report.
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cnnserve-ts-")))
        behind = None
        if any(s.backend == "torchserve" for s in scenarios):
            behind = stack.enter_context(running_torchserve(scratch, 1, 0))
        # TorchServe alone, once per worker count measured (each started before any load).
        alone: dict[int, TorchServeRun] = {}
        for workers in sorted(
            {s.torchserve_workers for s in scenarios if s.backend == TORCHSERVE_REST}
        ):
            alone[workers] = stack.enter_context(
                running_torchserve(scratch, BATCHING_MAX_BATCH_SIZE, TORCHSERVE_REST_DELAY_MS,
                                   workers=workers)
            )  # fmt: skip
        gateways = _start_gateways(ctx, scenarios, behind, stack)
        echo = stack.enter_context(echo_server(Settings().event_loop))
        echo_cache: dict[tuple[str, int, int, str, int], LoadResult] = {}
        for scenario in sorted(scenarios, key=_side_by_side):
            if scenario.backend == TORCHSERVE_REST:
                row = _measure_rest(ctx, scenario, alone[scenario.torchserve_workers])
            else:
                gateway, rss_start = gateways[_gateway_key(scenario)]
                torchserve = behind if scenario.backend == "torchserve" else None
                row = _measure(ctx, scenario, gateway, torchserve)
                row["gateway_rss_start_mb"] = rss_start / 2**20
                if torchserve is not None:
                    row["torchserve_rss_mb"] = torchserve.rss_bytes() / 2**20
                if scenario.transport == "grpc" and scenario.client == "loadgen":
                    _add_echo(ctx, row, echo, echo_cache)
            _record(ctx, row)
    return ctx.rows


def _side_by_side(scenario: Scenario) -> tuple[str, int, int, int]:
    """Comparable scenarios sort together; the sort is stable, so profile order decides
    within (the default configuration first)."""
    return (scenario.model, scenario.side, scenario.items, scenario.concurrency)


GatewayKey = tuple[str, tuple[tuple[str, str], ...]]


def _gateway_key(scenario: Scenario) -> GatewayKey:
    return (scenario.backend, tuple(sorted(scenario.gateway_env().items())))


def _start_gateways(
    ctx: _Context, scenarios: list[Scenario], torchserve: TorchServeRun | None, stack: ExitStack
) -> dict[GatewayKey, tuple[GatewayProcess, int]]:
    """One gateway process per distinct configuration (stopped with ``stack``), and its RSS
    once started."""
    gateways: dict[GatewayKey, tuple[GatewayProcess, int]] = {}
    for scenario in scenarios:
        key = _gateway_key(scenario)
        if scenario.backend == TORCHSERVE_REST or key in gateways:
            continue
        env = {"CNNSERVE_MODEL_REPOSITORY": str(demo_repository(ctx.artifacts)), **dict(key[1])}
        if scenario.backend == "torchserve":
            assert torchserve is not None
            env.update(torchserve.gateway_env())
        gateway = start_gateway(scenario.backend, env, ctx.out_dir / "gateway.log")
        stack.callback(gateway.stop)
        gateways[key] = (gateway, gateway.rss_bytes())
    return gateways


def _record(ctx: _Context, row: dict[str, Any]) -> None:
    ctx.rows.append(row)
    with (ctx.out_dir / "results.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    logger.info(
        "%s: %.0f req/s, p50 %.2f ms, p99 %.2f ms, batch %.1f",
        row["label"],
        row["requests_per_s"],
        row["p50_ms"],
        row["p99_ms"],
        row.get("mean_batch_size") or 0.0,
    )


def _base_row(scenario: Scenario) -> dict[str, Any]:
    row = asdict(scenario)
    row["overrides"] = dict(scenario.overrides)
    row["label"] = scenario.label
    return row


def _load_spec(ctx: _Context, scenario: Scenario, gateway: GatewayProcess) -> LoadSpec:
    """The request a scenario sends and where, checked once (a refused request would
    otherwise be measured as a fast error)."""
    items, c = scenario.items, scenario.concurrency
    if scenario.transport == "grpc":
        payload = oip_request(scenario.model, scenario.side, items, scenario.payload)
        check_request(gateway.grpc_target, payload)
        return LoadSpec(gateway.grpc_target, payload, items, ctx.duration_s, ctx.warmup_s, c,
                        processes=ctx.processes, channels=CLIENT_CHANNELS)  # fmt: skip
    target = gateway.http_target
    if scenario.transport == "rest":
        request = oip_rest_request(target, scenario.model, scenario.side, items, scenario.payload)
    elif scenario.transport == "predict":
        request = predict_request(target, scenario.model)
    else:
        raise ValueError(f"unknown transport {scenario.transport!r}")
    _check_http(target, request, scenario.label)
    return LoadSpec(target, request, items, ctx.duration_s, ctx.warmup_s, c,
                    processes=ctx.processes, transport="http")  # fmt: skip


def _check_http(target: str, request: bytes, what: str) -> None:
    status, body = check_http_request(target, request)
    if status != 200:
        raise RuntimeError(f"{what}: answered {status}: {body[:200]!r}")


def _measure(
    ctx: _Context,
    scenario: Scenario,
    gateway: GatewayProcess,
    torchserve: TorchServeRun | None = None,
) -> dict[str, Any]:
    before = batch_sizes(gateway.metrics_url, scenario.model)
    cpu: dict[str, float] = {}
    if scenario.client == "perf_analyzer":
        figures = _measure_perf_analyzer(scenario, gateway)
    else:
        servers: dict[str, CpuMeter] = {"gateway": gateway}
        if torchserve is not None:
            servers["torchserve"] = torchserve
        used = _cpu_used(servers)
        figures = run_load(_load_spec(ctx, scenario, gateway)).as_dict()
        cpu = _cpu_per_request(ctx, used(), figures["requests_per_s"])
    formed = batch_sizes(gateway.metrics_url, scenario.model).minus(before)
    row = {
        **_base_row(scenario),
        **figures,
        **cpu,
        "mean_batch_size": formed.mean,
        "batch_size_buckets": formed.buckets,
        "gateway_rss_end_mb": gateway.rss_bytes() / 2**20,
    }
    if scenario.client == "perf_analyzer":
        return row
    # Baseline (a) now, beside the scenario, while the gateway idles.
    batch = max(1, round(formed.mean))
    alone = ctx.alone.measure(scenario.backend, scenario.model, scenario.side, batch)
    row["model_alone_batch"] = batch
    row["model_alone_images_per_s"] = alone["images_per_s"]
    row["model_alone_p50_ms"] = alone["p50_ms"]
    return row


class CpuMeter(Protocol):
    """A server whose processes' CPU time can be read."""

    def cpu_seconds(self) -> float:
        """CPU time used so far by all of its processes."""
        ...


def _cpu_used(servers: dict[str, CpuMeter]) -> Callable[[], dict[str, float]]:
    """Read each server's CPU time now; the function returned gives what each used since."""
    start = {name: server.cpu_seconds() for name, server in servers.items()}
    return lambda: {name: servers[name].cpu_seconds() - start[name] for name in servers}


def _cpu_per_request(
    ctx: _Context, used: dict[str, float], requests_per_s: float
) -> dict[str, float]:
    """``<server>_cpu_ms_per_request``: each server's CPU time over the run (warm-up
    included) per request it served meanwhile — the requests counted at the measured rate
    over warm-up and measurement alike, so an approximation that holds for a steady load."""
    served = requests_per_s * (ctx.warmup_s + ctx.duration_s)
    if served <= 0:
        return {}
    return {f"{name}_cpu_ms_per_request": 1000 * seconds / served for name, seconds in used.items()}


def _measure_perf_analyzer(scenario: Scenario, gateway: GatewayProcess) -> dict[str, Any]:
    """perf_analyzer's figures in the row's fields; where it could not run, the row keeps the
    reason and no figures (``perf_analyzer_ok`` false) and the run goes on."""
    result = run_perf_analyzer(
        gateway.grpc_target, scenario.model, scenario.side, scenario.items, scenario.concurrency
    )
    if not result.ok:
        logger.warning("%s: %s", scenario.label, result.reason)
    return {
        "perf_analyzer_ok": result.ok,
        "perf_analyzer_reason": result.reason,
        "requests": result.requests,
        "succeeded": result.requests,
        "errors": {},
        "requests_per_s": result.requests_per_s,
        "images_per_s": result.images_per_s,
        "p50_ms": result.p50_ms,
        "p90_ms": result.p90_ms,
        "p99_ms": result.p99_ms,
        # Over perf_analyzer's measured windows, from the gateway's own statistics.
        "perf_analyzer_mean_batch_size": result.mean_batch_size,
    }


def _measure_rest(ctx: _Context, scenario: Scenario, torchserve: TorchServeRun) -> dict[str, Any]:
    request = rest_request(torchserve.rest_target, scenario.model, torchserve.inference_key)
    _check_http(torchserve.rest_target, request, scenario.label)
    used = _cpu_used({"torchserve": torchserve})
    result = run_load(
        LoadSpec(torchserve.rest_target, request, scenario.items, ctx.duration_s, ctx.warmup_s,
                 scenario.concurrency, processes=ctx.processes, transport="http")
    )  # fmt: skip
    return {
        **_base_row(scenario),
        **result.as_dict(),
        **_cpu_per_request(ctx, used(), result.requests_per_s),
        "torchserve_batch_size": torchserve.batch_size,
        "torchserve_max_batch_delay_ms": torchserve.max_batch_delay_ms,
        "torchserve_workers": torchserve.workers,
        "torchserve_rss_mb": torchserve.rss_bytes() / 2**20,
    }


def _add_echo(
    ctx: _Context,
    row: dict[str, Any],
    target: str,
    cache: dict[tuple[str, int, int, str, int], LoadResult],
) -> None:
    """Baseline (b): the echo of the row's payload at its concurrency, measured right after
    the first row that needs it."""
    key = (row["model"], row["side"], row["items"], row["payload"], row["concurrency"])
    if key not in cache:
        payload = oip_request(row["model"], row["side"], row["items"], row["payload"])
        cache[key] = run_load(
            LoadSpec(target, payload, row["items"], ctx.duration_s, ctx.warmup_s,
                     row["concurrency"], processes=ctx.processes, channels=CLIENT_CHANNELS)
        )  # fmt: skip
    row["echo_requests_per_s"] = cache[key].requests_per_s
    row["echo_p50_ms"] = cache[key].p50_ms


def machine_description() -> str:
    """CPU, cores, memory, load and library versions, for the report's header."""
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
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (
        f"{cpu}; {psutil.cpu_count()} logical cores; "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; {gpu}; load average at the start "
        f"{load} (shared host); Python {platform.python_version()}; torch {torch.__version__}; "
        f"onnxruntime {onnxruntime.__version__}"
    )
