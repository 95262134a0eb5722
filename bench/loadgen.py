"""A load generator for the Open Inference Protocol over gRPC.

Several client processes (so the client is not the bottleneck on a small machine) each run
an asyncio loop that sends one pre-serialized ``ModelInfer`` request over and over:

* closed loop — ``concurrency`` requests in flight at all times;
* open loop — requests sent at ``rate_rps`` on a fixed schedule, latency measured from the
  scheduled send time so a stalled server cannot hide its queueing (no coordinated omission).

Requests and responses travel as bytes (no protobuf parsing per call); one response is parsed
up front to prove the request is valid.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
import numpy as np

from cnnserve.protocol import open_inference_pb2 as pb

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
#: Outstanding requests one open-loop process allows before it counts a send as dropped.
OPEN_LOOP_MAX_OUTSTANDING = 4096


@dataclass(frozen=True)
class LoadSpec:
    """One load scenario against one gRPC target."""

    target: str
    request: bytes
    items_per_request: int
    duration_s: float = 10.0
    warmup_s: float = 2.0
    concurrency: int = 1
    rate_rps: float | None = None
    processes: int = 2
    timeout_s: float = 30.0


@dataclass
class LoadResult:
    """What a scenario measured (latencies in milliseconds)."""

    requests: int
    succeeded: int
    errors: dict[str, int]
    seconds: float
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def infer_request(
    model: str,
    items: np.ndarray,
    input_name: str = "input",
    outputs: tuple[str, ...] = (),
) -> bytes:
    """A serialized ``ModelInferRequest`` carrying ``items`` as raw contents."""
    datatype = {np.dtype(np.float32): "FP32", np.dtype(np.uint8): "UINT8"}[items.dtype]
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add()
    tensor.name = input_name
    tensor.datatype = datatype
    tensor.shape.extend(items.shape)
    request.raw_input_contents.append(np.ascontiguousarray(items).tobytes())
    for name in outputs:
        request.outputs.add().name = name
    return request.SerializeToString()


def check_request(target: str, request: bytes, timeout_s: float = 60.0) -> pb.ModelInferResponse:
    """Send ``request`` once and parse the answer; raises grpc.RpcError if it fails."""
    with grpc.insecure_channel(target, options=_channel_options()) as channel:
        call = channel.unary_unary(MODEL_INFER)
        return pb.ModelInferResponse.FromString(call(request, timeout=timeout_s))


def _channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", 256 << 20),
        ("grpc.max_receive_message_length", 256 << 20),
    ]


def run_load(spec: LoadSpec) -> LoadResult:
    """Run ``spec`` across ``spec.processes`` client processes and aggregate their figures."""
    context = multiprocessing.get_context("spawn")  # grpc is not fork-safe
    start_at = time.time() + 1.5  # let every process connect before the clock starts
    pipes: list[Connection] = []
    workers = []
    for index in range(spec.processes):
        receiver, sender = context.Pipe(duplex=False)
        share = _share(spec, index)
        worker = context.Process(
            target=_worker_main, args=(spec, share, start_at, sender), daemon=True
        )
        worker.start()
        pipes.append(receiver)
        workers.append(worker)
    parts = [pipe.recv() for pipe in pipes]
    for worker in workers:
        worker.join(timeout=10)
    latencies = np.concatenate([p["latencies"] for p in parts]) if parts else np.zeros(0)
    errors: Counter[str] = Counter()
    for part in parts:
        errors.update(part["errors"])
    succeeded = int(sum(p["succeeded"] for p in parts))
    requests = succeeded + sum(errors.values())
    seconds = spec.duration_s
    p50, p90, p99 = (
        float(np.percentile(latencies, q)) if latencies.size else float("nan") for q in (50, 90, 99)
    )
    return LoadResult(
        requests=requests,
        succeeded=succeeded,
        errors=dict(errors),
        seconds=seconds,
        requests_per_s=succeeded / seconds,
        images_per_s=succeeded * spec.items_per_request / seconds,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
    )


@dataclass(frozen=True)
class _Share:
    concurrency: int
    rate_rps: float | None


def _share(spec: LoadSpec, index: int) -> _Share:
    """Split concurrency (or rate) evenly; the first processes take the remainder."""
    if spec.rate_rps is not None:
        return _Share(0, spec.rate_rps / spec.processes)
    base, extra = divmod(spec.concurrency, spec.processes)
    return _Share(base + (1 if index < extra else 0), None)


def _worker_main(spec: LoadSpec, share: _Share, start_at: float, pipe: Connection) -> None:
    result = asyncio.run(_worker(spec, share, start_at))
    pipe.send(result)
    pipe.close()


async def _worker(spec: LoadSpec, share: _Share, start_at: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(spec.target, options=_channel_options()) as channel:
        call = channel.unary_unary(MODEL_INFER)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        clock_start = time.perf_counter()
        measure_from = clock_start + spec.warmup_s
        stop_at = measure_from + spec.duration_s

        async def one(sent_at: float) -> None:
            try:
                await call(spec.request, timeout=spec.timeout_s)
            except grpc.aio.AioRpcError as exc:
                if sent_at >= measure_from:
                    errors[exc.code().name] += 1
                return
            done = time.perf_counter()
            if measure_from <= sent_at < stop_at:
                latencies.append((done - sent_at) * 1000.0)

        if share.rate_rps is None:

            async def closed_loop() -> None:
                while (now := time.perf_counter()) < stop_at:
                    await one(now)

            await asyncio.gather(*(closed_loop() for _ in range(share.concurrency)))
        elif share.rate_rps > 0:
            interval = 1.0 / share.rate_rps
            pending: set[asyncio.Task[None]] = set()
            next_send = clock_start
            while next_send < stop_at:
                await asyncio.sleep(max(0.0, next_send - time.perf_counter()))
                if len(pending) >= OPEN_LOOP_MAX_OUTSTANDING:
                    if next_send >= measure_from:
                        errors["CLIENT_DROPPED"] += 1
                else:
                    task = asyncio.create_task(one(next_send))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                next_send += interval
            if pending:
                await asyncio.gather(*pending)
    return {
        "latencies": np.asarray(latencies, dtype=np.float64),
        "errors": dict(errors),
        "succeeded": len(latencies),
    }
