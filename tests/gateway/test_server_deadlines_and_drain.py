"""Deadlines and graceful drain, on real servers and real ``cnnserve serve`` processes.

- A request whose deadline passes while it waits behind a slow batch is never computed: the
  backend never sees it, the caller gets DEADLINE_EXCEEDED / 504, and
  ``cnnserve_expired_before_compute_total`` counts it.
- SIGTERM under load: readiness turns false first (HTTP /v2/health/ready 503) and gRPC
  clients are sent GOAWAY at once (a new call on an existing channel does not reach the
  process: UNAVAILABLE from the client's own connection attempt); new HTTP calls are refused
  503 while every accepted call, unary or on an open stream, is answered, and the process
  exits 0 — within ``drain_grace_s`` even when a client holds a stream open.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cnnserve.gateway.dataplane import DataPlane
from cnnserve.models.repository import ModelVersion
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.protocol.grpc_codec import response_from_proto
from tests.gateway.harness import (
    StubBackend,
    digit_pixels,
    holding_settings,
    labels_request_json,
    metric,
    running_gateway,
    wait_for_metric,
)
from tests.support import GatewayProcess, gateway_process, wait_until_async

Stub = pb_grpc.GRPCInferenceServiceStub
#: Refusal message of a draining core (new calls after SIGTERM).
DRAINING = "not accepting requests"
#: Pixel value marking the items of a request, so the backend's inputs say who reached it.
MARKS = {"first": 10, "grpc_late": 20, "http_late": 30, "after": 40}


def _marked_request(mark: int, count: int = 1) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="convnet")
    request.inputs.add(name="pixels", datatype="UINT8", shape=[count, 3, 28, 28])
    request.raw_input_contents.append(np.full((count, 3, 28, 28), mark, np.uint8).tobytes())
    return request


def _digits_request(count: int) -> pb.ModelInferRequest:
    pixels, _ = digit_pixels(range(count))
    request = pb.ModelInferRequest(model_name="convnet")
    request.inputs.add(name="pixels", datatype="UINT8", shape=pixels.shape)
    request.raw_input_contents.append(pixels.tobytes())
    request.outputs.add(name="labels")
    return request


@dataclass
class HeldBackend(StubBackend):
    """A backend that holds each batch until released and records the pixels it saw."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    seen: list[int] = field(default_factory=list)

    async def infer_batch(self, model: ModelVersion, batch: np.ndarray) -> np.ndarray:
        """Record each item's mark, wait for the release, answer zeros."""
        self.seen += [int(item.flat[0]) for item in batch]
        self.entered.set()
        await self.release.wait()
        return np.zeros((len(batch), 10), np.float32)

    def describe(self) -> str:
        """Platform name."""
        return "held"

    def decodes_images(self, model: ModelVersion) -> bool:
        return False

    def takes_pixels(self, model: ModelVersion) -> bool:
        """Pixels arrive as they were sent, so the marks survive."""
        return True


async def test_expired_while_queued_is_never_computed(model_repository: Path) -> None:
    """A slow batch keeps two requests queued past their deadlines (a gRPC deadline and the
    OIP ``timeout`` parameter over HTTP): both time out, neither reaches the backend, both
    are counted; a request queued without a deadline is computed once the batch finishes."""
    settings = holding_settings(model_repository, 0.0, max_batch_size=1)
    backend = HeldBackend()
    core = DataPlane(settings, backend)
    async with (
        running_gateway(settings, core) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http,
    ):
        stub = Stub(channel)
        first = asyncio.ensure_future(stub.ModelInfer(_marked_request(MARKS["first"])))
        await backend.entered.wait()
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.ModelInfer(_marked_request(MARKS["grpc_late"]), timeout=0.3)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        body = {
            "parameters": {"timeout": 300_000},  # µs
            "inputs": [
                {
                    "name": "pixels",
                    "datatype": "UINT8",
                    "shape": [1, 3, 28, 28],
                    "data": [MARKS["http_late"]] * 2352,
                }
            ],
        }
        reply = await http.post("/v2/models/convnet/infer", json=body)
        assert reply.status_code == 504
        assert "deadline exceeded" in reply.json()["error"]
        after = asyncio.ensure_future(stub.ModelInfer(_marked_request(MARKS["after"])))
        await wait_for_metric(gateway.metrics_port, "cnnserve_queue_depth", 1, model="convnet")
        backend.release.set()
        assert (await first).outputs[0].name == "labels"
        assert (await after).outputs[0].name == "labels"
        expired = await metric(
            gateway.metrics_port, "cnnserve_expired_before_compute_total", model="convnet"
        )
        timed_out = await metric(
            gateway.metrics_port,
            "cnnserve_requests_total",
            model="convnet",
            outcome="deadline_exceeded",
        )
    assert backend.seen == [MARKS["first"], MARKS["after"]]
    assert expired == 2
    assert timed_out == 2


async def test_stop_answers_in_flight_and_refuses_new_calls_over_the_wire(
    model_repository: Path,
) -> None:
    """While a unary call and a request on an open ModelStreamInfer stream wait in the
    batcher, stop(): the gRPC channel is sent GOAWAY (its new calls never reach the
    process), HTTP readiness is 503 on the still-open listener and a new HTTP call 503; the
    unary call is answered, and so is the stream's request, and the stream then ends OK."""
    # The calls wait 5 s in the queue: the drain's checks below must see them still waiting,
    # and on a busy host those checks took more than 1.5 s.
    async with (
        running_gateway(holding_settings(model_repository, 5000.0)) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http,
    ):
        stub = Stub(channel)
        in_flight = asyncio.ensure_future(stub.ModelInfer(_digits_request(2)))
        half_close = asyncio.Event()
        stream = _open_stream(stub, half_close)
        streamed = asyncio.ensure_future(anext(stream))
        await wait_for_metric(gateway.metrics_port, "cnnserve_queue_depth", 3, model="convnet")
        stopping = asyncio.ensure_future(gateway.stop(10.0))
        await _assert_draining(channel, http)
        # The plaintext metrics listener answers the same readiness (probes under mutual TLS).
        async with httpx.AsyncClient() as probe:
            metrics_ready = await probe.get(
                f"http://127.0.0.1:{gateway.metrics_port}/v2/health/ready"
            )
        assert (metrics_ready.status_code, metrics_ready.json()) == (503, {"ready": False})
        assert not in_flight.done() and not streamed.done()
        response = await in_flight
        assert list(response.outputs[0].shape) == [2, 1]
        answer = await streamed
        assert not answer.error_message
        assert list(answer.infer_response.outputs[0].shape) == [1, 1]
        half_close.set()
        assert [r async for r in stream] == []  # the stream ended with OK
        await stopping


async def test_grace_runs_out_for_a_stuck_batch(model_repository: Path) -> None:
    """A batch that never finishes: stop() returns after the grace and its caller gets
    UNAVAILABLE, not a hang."""
    settings = holding_settings(model_repository, 0.0)
    backend = HeldBackend()  # never released
    async with (
        running_gateway(settings, DataPlane(settings, backend)) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
    ):
        stuck = asyncio.ensure_future(Stub(channel).ModelInfer(_marked_request(1)))
        await backend.entered.wait()
        await asyncio.wait_for(gateway.stop(1.0), 30)
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await stuck
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shut down" in (cut.value.details() or "")


async def _assert_draining(channel: grpc.aio.Channel, http: httpx.AsyncClient) -> None:
    """gRPC: the channel was told to go away and no new call on it reaches the process (the
    listener is closed too), probes included. HTTP: readiness 503, liveness 200, a new
    inference call refused 503."""
    stub = Stub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    await _wait_told_to_go_away(stub)
    new_calls: list[Awaitable[object]] = [
        stub.ServerReady(pb.ServerReadyRequest()),
        stub.ServerLive(pb.ServerLiveRequest()),
        health.Check(health_pb2.HealthCheckRequest(service="")),
        stub.ModelInfer(_digits_request(1)),
    ]
    for call in new_calls:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # The client's own connection attempt failed: the process never saw the call.
        assert DRAINING not in (refused.value.details() or "")
    ready = await http.get("/v2/health/ready")
    assert ready.status_code == 503
    assert ready.json() == {"ready": False}
    assert (await http.get("/v2/health/live")).status_code == 200
    reply = await http.post("/predict/convnet", content=b"\x89PNG")
    assert reply.status_code == 503
    assert DRAINING in reply.json()["error"]


#: What a call gets that races the GOAWAY: the gRPC server cancels a call it received but
#: had not handed to the gateway yet when its stop began, or that arrived before the client
#: read the GOAWAY (grpc core: no grace for new streams), so CANCELLED is one answer.
RACING_GOAWAY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


async def _wait_told_to_go_away(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """Poll ServerReady until the channel no longer reaches the server: the GOAWAY (sent when
    the drain begins, after a signal that arrives asynchronously) has been read."""

    async def gone() -> bool:
        try:
            await stub.ServerReady(pb.ServerReadyRequest(), timeout=2)
        except grpc.aio.AioRpcError as exc:
            # A probe sent as the drain began may also go unanswered within its own 2 s while
            # the process finishes the load's calls (seen once in a loaded run): ask again.
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return False
            if exc.code() not in RACING_GOAWAY:
                raise
            # Until the GOAWAY is read a call may still be cancelled; then UNAVAILABLE.
            return exc.code() == grpc.StatusCode.UNAVAILABLE
        return False

    await wait_until_async(gone, 20.0, "the gRPC channel to be sent away after SIGTERM", 0.01)


# --- real processes ---


async def _exit_status(served: GatewayProcess, within_s: float) -> int:
    """The exit status, waiting at most ``within_s`` (a bound, not a measurement)."""
    return await asyncio.to_thread(served.process.wait, within_s)


@dataclass
class CallerLog:
    """What one load-generating caller saw, request by request."""

    answered: list[int] = field(default_factory=list)  # item counts of successful calls
    refused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


#: gRPC codes a refused call may get: UNAVAILABLE (draining, or the listener already closed).
REFUSED_GRPC = {grpc.StatusCode.UNAVAILABLE}


async def _grpc_caller(stub: pb_grpc.GRPCInferenceServiceStub, count: int, out: CallerLog) -> None:
    """Call until refused; every answer must carry ``count`` correct labels."""
    _, labels = digit_pixels(range(count))
    for _ in range(200):  # bounded: the drain refuses long before
        try:
            response = await stub.ModelInfer(_digits_request(count), timeout=60)
        except grpc.aio.AioRpcError as exc:
            kind = out.refused if exc.code() in REFUSED_GRPC else out.failed
            kind.append(f"{exc.code().name}: {exc.details()}")
            return
        (answer,) = response_from_proto(response).outputs
        got = [int(row[0]) for row in answer.data]
        if got != labels:
            out.failed.append(f"wrong labels {got}")
            return
        out.answered.append(count)


async def _http_caller(http: httpx.AsyncClient, count: int, out: CallerLog) -> None:
    """Call until refused (503 or a closed listener)."""
    pixels, labels = digit_pixels(range(count))
    body = labels_request_json(pixels)
    for _ in range(200):
        try:
            reply = await http.post("/v2/models/convnet/infer", json=body, timeout=60)
        except httpx.TransportError as exc:
            # Only once the drain is over: the listener closed, or closed this idle
            # keep-alive connection as the request went out. An accepted call must never
            # end like this, and the first one is accepted (it was queued at SIGTERM).
            kind = out.refused if out.answered else out.failed
            kind.append(f"{type(exc).__name__}: {exc}")
            return
        if reply.status_code == 503:
            out.refused.append(reply.json()["error"])
            return
        if reply.status_code != 200:
            out.failed.append(f"{reply.status_code}: {reply.text}")
            return
        got = [int(label) for label in reply.json()["outputs"][0]["data"]]
        if got != labels:
            out.failed.append(f"wrong labels {got}")
            return
        out.answered.append(count)


async def test_sigterm_under_load_answers_every_accepted_call(
    model_repository: Path, tmp_path: Path
) -> None:
    """Six gRPC and three HTTP callers in a loop (2, 3, 1 items), SIGTERM while all of them
    wait in the queue: gRPC clients sent away and HTTP readiness false first, new calls
    refused on both transports, every accepted call answered with the right labels, exit
    status 0 within the grace."""
    grace_s = 30.0
    with gateway_process(
        "onnxruntime",
        tmp_path / "gateway.log",
        model_repository=model_repository,
        device="cpu",
        # Batches leave only when the 3 s delay ends (never full): callers are in flight.
        max_batch_delay_ms=3000,
        adaptive_batch_delay=False,
        max_batch_size=256,
        drain_grace_s=grace_s,
    ) as served:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.http_port}") as http,
        ):
            stub = Stub(channel)
            counts = [2, 3, 1] * 3
            logs = [CallerLog() for _ in counts]
            callers = [
                _grpc_caller(stub, n, log) if i < 6 else _http_caller(http, n, log)
                for i, (n, log) in enumerate(zip(counts, logs, strict=True))
            ]
            load = asyncio.gather(*callers)
            await wait_for_metric(
                served.metrics_port, "cnnserve_queue_depth", sum(counts), model="convnet"
            )
            served.process.send_signal(signal.SIGTERM)
            # Sent away / not ready, new calls refused, while the queued calls still wait.
            await _assert_draining(channel, http)
            assert not load.done()
            await asyncio.wait_for(load, 60)
        status = await _exit_status(served, grace_s + 15)
    output = served.output()
    assert status == 0, output
    for count, log in zip(counts, logs, strict=True):
        assert not log.failed, log.failed
        assert log.answered == [count]  # the call in flight at SIGTERM was answered ...
        assert len(log.refused) == 1  # ... and the next one refused
    assert "SIGTERM received" in output
    assert "drain grace ran out" not in output
    assert "gateway stopped" in output


async def _open_stream(
    stub: pb_grpc.GRPCInferenceServiceStub, hold: asyncio.Event
) -> AsyncIterator[pb.ModelStreamInferResponse]:
    """A ModelStreamInfer stream of one request, kept open until ``hold`` is set."""

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        yield _digits_request(1)
        await hold.wait()  # keep the stream open: the client half-closes only then

    async for response in stub.ModelStreamInfer(requests()):
        yield response


async def test_sigterm_exits_within_the_grace_despite_an_open_stream(
    model_repository: Path, tmp_path: Path
) -> None:
    """A client keeps a ModelStreamInfer stream open forever: the process still exits 0
    once ``drain_grace_s`` has passed, cutting the stream."""
    grace_s = 3.0
    with gateway_process(
        "onnxruntime",
        tmp_path / "gateway.log",
        model_repository=model_repository,
        device="cpu",
        drain_grace_s=grace_s,
    ) as served:
        hold = asyncio.Event()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
            stub = Stub(channel)
            stream = _open_stream(stub, hold)
            first = await anext(stream)
            assert not first.error_message
            served.process.send_signal(signal.SIGTERM)
            await _wait_told_to_go_away(stub)
            # Without the grace the process would wait for this stream forever.
            status = await _exit_status(served, grace_s + 20)
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await anext(stream)
            hold.set()
    assert status == 0, served.output()
    assert cut.value.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert "gateway stopped" in served.output()
