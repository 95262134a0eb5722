"""What the access log (and tracing) cost a gateway: requests/s and gateway CPU per request,
with each off and on, in alternating runs (docs/observability.md quotes the output).

    python tools/observability_cost.py [--runs 3] [--duration-s 10] [--concurrency 8]
    python tools/observability_cost.py --record-only

Each run starts ``cnnserve serve --backend onnxruntime`` on the CPU over the demo repository,
sends one-digit ConvNet requests over gRPC with bench/loadgen.py's closed loop, and reads the
gateway's CPU seconds before and after. Variants: ``off`` (the default settings), ``access``
(CNNSERVE_ACCESS_LOG=true, JSON lines to the gateway's log file), ``tracing`` (the access log
and every request's spans, exported over OTLP/gRPC to a collector in this process that takes
them and keeps nothing: what tracing costs the gateway while its collector keeps up).

``--record-only`` times the access log's own work instead, in this process and without a
gateway around it (a loaded machine blurs a few percent in the runs above): a request's
record made and filled as the transports and the data plane do, then that plus writing it
to /dev/null as a JSON line and as a text line, in microseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
import timeit
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from cnnserve.bench.gateway_process import demo_repository, start_gateway
from cnnserve.bench.loadgen import LoadResult, LoadSpec, infer_request, run_load
from cnnserve.gateway.access_log import RequestRecord
from cnnserve.gateway.batcher import ModelTime
from cnnserve.logs import TEXT_FORMAT, JsonFormatter

#: Seconds of load before each measured window.
WARMUP_S = 3.0
VARIANTS: dict[str, dict[str, str]] = {
    "off": {},
    "access": {"CNNSERVE_ACCESS_LOG": "true", "CNNSERVE_LOG_FORMAT": "json"},
    "tracing": {
        "CNNSERVE_ACCESS_LOG": "true",
        "CNNSERVE_LOG_FORMAT": "json",
        # Filled in with the sink's address.
        "CNNSERVE_TRACING_OTLP_ENDPOINT": "",
    },
}


class SpanSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace collector that accepts every export and keeps the spans and their
    services' names."""

    def __init__(self) -> None:
        self.received: list[trace_pb2.Span] = []
        self.services: set[str] = set()

    @property
    def spans(self) -> int:
        """Spans received so far."""
        return len(self.received)

    @property
    def names(self) -> list[str]:
        """The received spans' names, in order."""
        return [span.name for span in self.received]

    def Export(  # noqa: N802 (the gRPC method's name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource in request.resource_spans:
            self.services.update(
                a.value.string_value
                for a in resource.resource.attributes
                if a.key == "service.name"
            )
            self.received += [span for scope in resource.scope_spans for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.contextmanager
def span_sink() -> Iterator[tuple[str, SpanSink]]:
    """A :class:`SpanSink` on a free loopback port: its endpoint and itself."""
    sink = SpanSink()
    server = grpc.server(ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", sink
    finally:
        server.stop(grace=None)


def measure(
    variant: str, repository: Path, work: Path, duration_s: float, concurrency: int
) -> dict[str, float]:
    """One run of ``variant``: requests/s, p50 and gateway CPU ms per request."""
    overrides = {
        "CNNSERVE_MODEL_REPOSITORY": str(repository),
        "CNNSERVE_DEVICE": "cpu",
        **VARIANTS[variant],
    }
    sink: SpanSink | None = None
    with contextlib.ExitStack() as stack:
        if "CNNSERVE_TRACING_OTLP_ENDPOINT" in overrides:
            endpoint, sink = stack.enter_context(span_sink())
            overrides["CNNSERVE_TRACING_OTLP_ENDPOINT"] = endpoint
        gateway = start_gateway("onnxruntime", overrides, work / f"{variant}.log")
        stack.callback(gateway.stop)

        request = infer_request("convnet", np.zeros((1, 3, 28, 28), np.float32))

        def load(seconds: float) -> LoadResult:
            return run_load(
                LoadSpec(
                    gateway.grpc_target,
                    request,
                    1,
                    duration_s=seconds,
                    warmup_s=0.0,
                    concurrency=concurrency,
                )
            )

        load(WARMUP_S)  # not counted: the CPU below is the measured window's alone
        before = gateway.cpu_seconds()
        result = load(duration_s)
        cpu = gateway.cpu_seconds() - before
    row: dict[str, float] = {
        "requests_per_s": round(result.requests_per_s, 1),
        "p50_ms": round(result.p50_ms, 2),
        "cpu_ms_per_request": round(cpu * 1000 / max(result.requests, 1), 3),
        "errors": sum(result.errors.values()),
    }
    if sink is not None:
        row["spans_exported"] = sink.spans  # the gateway flushed its last ones as it stopped
    return row


def record_cost(rounds: int = 20_000) -> dict[str, float]:
    """Microseconds per request of the access record alone, and with its line written."""
    sink = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 - lives with the process
    logging.basicConfig(level=logging.INFO, handlers=[sink], force=True)

    def one(write: bool) -> None:
        record = RequestRecord(None, "grpc", "/inference.GRPCInferenceService/ModelInfer")
        record.asked("", "convnet")
        record.routed("convnet", "1", 1)
        record.ran(ModelTime(0.001, 0.0002, 4))
        record.status = "OK"
        if write:
            record.log()

    def per_call_us(write: bool) -> float:
        return round(timeit.timeit(lambda: one(write), number=rounds) / rounds * 1e6, 1)

    row = {"record_us": per_call_us(False)}
    sink.setFormatter(JsonFormatter())
    row["json_line_us"] = per_call_us(True)
    sink.setFormatter(logging.Formatter(TEXT_FORMAT))
    row["text_line_us"] = per_call_us(True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--record-only", action="store_true", help="time the record alone")
    args = parser.parse_args()
    if args.record_only:
        print(json.dumps(record_cost()))
        return
    with tempfile.TemporaryDirectory(prefix="cnnserve-obs-") as folder:
        work = Path(folder)
        # The benchmarks' own demo repository, exported once.
        repository = demo_repository(Path("artifacts"))
        for run in range(args.runs):
            for variant in args.variants:
                row = measure(variant, repository, work, args.duration_s, args.concurrency)
                print(json.dumps({"run": run, "variant": variant, **row}), flush=True)


if __name__ == "__main__":
    main()
