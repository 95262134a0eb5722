"""OpenTelemetry spans of a real gateway (its HTTP app and ``grpc.aio`` server, real clients),
kept by the SDK's in-memory exporter: the caller's ``traceparent`` honoured (a malformed one
ignored), the request, queue wait, batch and infer spans with their attributes and links, and
the trace context sent on to TorchServe's gRPC API (a stand-in that records its metadata:
what a real TorchServe receives is not observable from outside it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from cnnserve import tracing
from cnnserve.gateway.access_log import REQUEST_ID_HEADER
from cnnserve.gateway.server import Gateway
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.protocol import torchserve_inference_pb2 as ts_pb
from cnnserve.protocol import torchserve_inference_pb2_grpc as ts_grpc
from cnnserve.settings import Settings
from tests.gateway.harness import (
    digit_pixels,
    gateway_settings,
    labels_request_json,
    raw_bytes_elements,
    running_gateway,
)
from tests.gateway.null_torchserve import NullTorchServe
from tests.images import digit_png
from tests.support import gateway_process
from tools.observability_cost import span_sink

pytestmark = pytest.mark.asyncio(loop_scope="module")

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """Every span the gateway ends, kept in memory for the module (tracing off after it)."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.use_provider(provider)
    try:
        yield spans
    finally:
        tracing.use_provider(None)
        provider.shutdown()


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    """The exporter, emptied for the test."""
    exporter.clear()
    return exporter


def _settings(model_repository: Path, **overrides: object) -> Settings:
    # Partial batches wait 50 ms for company, so concurrent requests share one.
    return gateway_settings(
        model_repository, max_batch_delay_ms=50.0, adaptive_batch_delay=False, **overrides
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(model_repository: Path, exporter: InMemorySpanExporter) -> AsyncIterator[Gateway]:
    """An onnxruntime gateway, tracing into ``exporter``."""
    async with running_gateway(_settings(model_repository)) as running:
        yield running


def image_request(count: int, **fields: object) -> pb.ModelInferRequest:
    """``count`` digit PNGs as one gRPC request to the ConvNet."""
    request = pb.ModelInferRequest(model_name="convnet", **fields)  # type: ignore[arg-type]
    request.inputs.add(name="image", datatype="BYTES", shape=[count])
    request.raw_input_contents.append(raw_bytes_elements([digit_png(i)[0] for i in range(count)]))
    return request


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    """The spans called ``name``."""
    return [s for s in spans if s.name == name]


def request_span(spans: Sequence[ReadableSpan], request_id: str) -> ReadableSpan:
    """The one SERVER span of ``request_id``."""
    (found,) = [
        s
        for s in spans
        if s.kind is SpanKind.SERVER
        and (s.attributes or {}).get("cnnserve.request_id") == request_id
    ]
    return found


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan, name: str) -> list[ReadableSpan]:
    """``parent``'s children called ``name``."""
    return [
        s
        for s in named(spans, name)
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


async def test_http_request_continues_the_callers_trace(
    http: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    pixels, _ = digit_pixels(range(2))
    reply = await http.post(
        "/v2/models/convnet/infer",
        json=labels_request_json(pixels),
        headers={"traceparent": TRACEPARENT, REQUEST_ID_HEADER: "traced-http"},
    )
    assert reply.status_code == 200
    finished = spans.get_finished_spans()
    server = request_span(finished, "traced-http")
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert server.parent is not None and f"{server.parent.span_id:016x}" == PARENT_ID
    assert server.parent.is_remote
    attributes = dict(server.attributes or {})
    assert attributes["http.request.method"] == "POST"
    assert attributes["url.path"] == "/v2/models/convnet/infer"
    assert attributes["http.response.status_code"] == 200
    assert (attributes["cnnserve.model"], attributes["cnnserve.model_version"]) == ("convnet", "1")
    assert attributes["cnnserve.items"] == 2
    assert server.status.status_code is StatusCode.UNSET
    # Its queue wait and the batch it ran in (a lone request: it leads its batch).
    (queue,) = children(finished, server, "queue wait")
    (batch,) = children(finished, server, "batch")
    (infer,) = children(finished, batch, "infer")
    assert server.start_time <= queue.start_time <= queue.end_time <= batch.start_time
    assert batch.start_time <= infer.start_time <= infer.end_time <= batch.end_time
    assert (batch.attributes or {})["cnnserve.batch_size"] == 2
    assert [link.context.span_id for link in batch.links] == [server.context.span_id]


async def test_grpc_calls_share_one_batch_span_linked_to_each(
    stub: pb_grpc.GRPCInferenceServiceStub, spans: InMemorySpanExporter
) -> None:
    await asyncio.gather(
        *(
            stub.ModelInfer(
                image_request(n),
                metadata=(("traceparent", TRACEPARENT), (REQUEST_ID_HEADER, f"traced-{n}")),
            )
            for n in (1, 3)
        )
    )
    finished = spans.get_finished_spans()
    servers = [request_span(finished, f"traced-{n}") for n in (1, 3)]
    for server in servers:
        assert server.name == "/inference.GRPCInferenceService/ModelInfer"
        assert server.parent is not None and f"{server.parent.span_id:016x}" == PARENT_ID
        attributes = dict(server.attributes or {})
        assert (attributes["rpc.system"], attributes["rpc.grpc.status_code"]) == ("grpc", "OK")
        assert len(children(finished, server, "queue wait")) == 1
    (batch,) = named(finished, "batch")
    assert (batch.attributes or {})["cnnserve.batch_size"] == 4
    assert (batch.attributes or {})["cnnserve.batch_requests"] == 2
    linked = {link.context.span_id for link in batch.links}
    assert linked == {s.context.span_id for s in servers}
    # The batch's parent is one of the requests it serves, so that trace shows the way.
    assert batch.parent is not None and batch.parent.span_id in linked


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage",
        f"00-{'0' * 32}-{PARENT_ID}-01",  # an all-zero trace id is invalid
        f"00-{TRACE_ID}-{PARENT_ID}-01" + "x" * 2000,  # over the length read
        "00-" + "g" * 32 + f"-{PARENT_ID}-01",
    ],
    ids=["garbage", "zero-trace", "oversized", "not-hex"],
)
async def test_a_malformed_traceparent_starts_a_new_trace_never_fails(
    http: httpx.AsyncClient,
    stub: pb_grpc.GRPCInferenceServiceStub,
    spans: InMemorySpanExporter,
    traceparent: str,
) -> None:
    pixels, _ = digit_pixels([4])
    reply = await http.post(
        "/v2/models/convnet/infer",
        json=labels_request_json(pixels),
        headers={"traceparent": traceparent, REQUEST_ID_HEADER: "bad-parent-http"},
    )
    assert reply.status_code == 200
    await stub.ModelInfer(
        image_request(1),
        metadata=(("traceparent", traceparent), (REQUEST_ID_HEADER, "bad-parent-grpc")),
    )
    finished = spans.get_finished_spans()
    for request_id in ("bad-parent-http", "bad-parent-grpc"):
        server = request_span(finished, request_id)
        assert server.parent is None
        assert f"{server.context.trace_id:032x}" != TRACE_ID


async def test_server_faults_mark_the_span_failed_caller_errors_do_not(
    http: httpx.AsyncClient,
    stub: pb_grpc.GRPCInferenceServiceStub,
    spans: InMemorySpanExporter,
) -> None:
    reply = await http.post(
        "/v2/models/nope/infer", json={"inputs": []}, headers={REQUEST_ID_HEADER: "nope-http"}
    )
    assert reply.status_code == 404
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.ModelInfer(
            pb.ModelInferRequest(model_name="nope"), metadata=((REQUEST_ID_HEADER, "nope-grpc"),)
        )
    finished = spans.get_finished_spans()
    http_span = request_span(finished, "nope-http")
    grpc_span = request_span(finished, "nope-grpc")
    assert (http_span.attributes or {})["http.response.status_code"] == 404
    assert (grpc_span.attributes or {})["rpc.grpc.status_code"] == "NOT_FOUND"
    assert http_span.status.status_code is StatusCode.UNSET
    assert grpc_span.status.status_code is StatusCode.UNSET


class RecordingTorchServe(NullTorchServe):
    """The stand-in TorchServe, keeping each Predictions call's metadata."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def Predictions(  # noqa: N802 (the gRPC method's name)
        self, request: ts_pb.PredictionsRequest, context: grpc.ServicerContext
    ) -> ts_pb.PredictionResponse:
        self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        return super().Predictions(request, context)


@pytest.fixture(scope="module")
def recording_torchserve() -> Iterator[tuple[str, RecordingTorchServe]]:
    """A :class:`RecordingTorchServe` on a free loopback port; its target and itself."""
    servicer = RecordingTorchServe()
    server = grpc.server(ThreadPoolExecutor(2))
    ts_grpc.add_InferenceAPIsServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


async def test_torchserve_call_carries_the_infer_spans_traceparent(
    model_repository: Path,
    tmp_path: Path,
    spans: InMemorySpanExporter,
    recording_torchserve: tuple[str, RecordingTorchServe],
) -> None:
    target, servicer = recording_torchserve
    settings = _settings(
        model_repository,
        backend="torchserve",
        torchserve_grpc_target=target,
        torchserve_token_auth=False,
        torchserve_registration=False,
        model_store_dir=tmp_path,
    )
    async with (
        running_gateway(settings) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
    ):
        await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            image_request(2),
            metadata=(("traceparent", TRACEPARENT), (REQUEST_ID_HEADER, "to-torchserve")),
        )
    finished = spans.get_finished_spans()
    server = request_span(finished, "to-torchserve")
    (batch,) = children(finished, server, "batch")
    (infer,) = children(finished, batch, "infer")
    sent = [m["traceparent"] for m in servicer.metadata if "traceparent" in m]
    assert f"00-{TRACE_ID}-{infer.context.span_id:016x}-01" in sent


async def test_configured_tracing_exports_over_otlp_to_a_collector() -> None:
    """The exporter ``tracing_otlp_endpoint`` sets up: spans reach a real OTLP/gRPC
    collector under the configured service name once the provider flushes; unset, there
    is nothing to set up."""
    assert tracing.configure(Settings()) is None
    with span_sink() as (endpoint, sink):
        provider = tracing.configure(
            Settings(tracing_otlp_endpoint=endpoint, tracing_service_name="cnnserve-test")
        )
        assert provider is not None
        try:
            with tracing.server_span("GET /v2", {"traceparent": TRACEPARENT}, {}) as span:
                assert tracing.trace_id(span) == TRACE_ID
        finally:
            tracing.use_provider(None)
            provider.shutdown()  # flushes, as the gateway does when it stops
    assert sink.names == ["GET /v2"]
    assert sink.services == {"cnnserve-test"}


async def test_the_batching_process_continues_the_frontends_traces(
    model_repository: Path, tmp_path: Path
) -> None:
    """Two frontends feeding one batching process, each process exporting its own spans: a
    request's queue wait and its batch (and the batch's infer) are recorded by the batching
    process in the request's trace, children of the frontend's request span."""
    with (
        span_sink() as (endpoint, sink),
        gateway_process(
            "onnxruntime",
            tmp_path / "gateway.log",
            model_repository=model_repository,
            gateway_processes=2,
            device="cpu",
            tracing_otlp_endpoint=endpoint,
        ) as gateway,
    ):
        # grpc.aio like the module's other calls, never a blocking channel beside this loop's
        # gRPC server.
        async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
            await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                image_request(2), metadata=(("traceparent", TRACEPARENT),)
            )
    # The gateway stopped before the collector: every process flushed its spans to it.
    traced = {s.name: s for s in sink.received if s.trace_id.hex() == TRACE_ID}
    server = traced["/inference.GRPCInferenceService/ModelInfer"]
    assert server.parent_span_id.hex() == PARENT_ID
    assert traced["queue wait"].parent_span_id == server.span_id
    assert traced["batch"].parent_span_id == server.span_id
    assert traced["infer"].parent_span_id == traced["batch"].span_id
