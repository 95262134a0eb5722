"""Request ids and the access log, through a real onnxruntime gateway: its HTTP app and its
``grpc.aio`` server, called with real clients.

One record per HTTP request (every route) and gRPC call, with the request's id, model,
version, status, items, latency, queue time and batch size; the id taken from the caller
(header, metadata or the OIP ``id``) when it is sane, replaced otherwise, and returned.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio

from cnnserve.gateway.access_log import MAX_REQUEST_ID_CHARS, REQUEST_ID_HEADER
from cnnserve.gateway.server import Gateway
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from tests.gateway.harness import (
    digit_pixels,
    gateway_settings,
    labels_request_json,
    raw_bytes_elements,
    running_gateway,
)
from tests.images import digit_png

pytestmark = pytest.mark.asyncio(loop_scope="module")

ACCESS = "cnnserve.access"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(model_repository: Path) -> AsyncIterator[Gateway]:
    """A gateway with the access log on; every partial batch waits 50 ms for company, so
    concurrent calls share one."""
    settings = gateway_settings(
        model_repository, access_log=True, max_batch_delay_ms=50.0, adaptive_batch_delay=False
    )
    async with running_gateway(settings) as running:
        yield running


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Captures the access records written during the test."""
    with caplog.at_level(logging.INFO, logger=ACCESS):
        yield caplog


def records(captured: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The access log's records among everything captured."""
    return [r for r in captured.records if r.name == ACCESS]


def only(captured: pytest.LogCaptureFixture, request_id: str) -> Any:
    """The one access record of ``request_id`` (its fields are attributes)."""
    (found,) = [r for r in records(captured) if r.__dict__["request_id"] == request_id]
    return found


def image_request(count: int, model: str = "convnet", **fields: object) -> pb.ModelInferRequest:
    """``count`` digit PNGs as one gRPC request."""
    request = pb.ModelInferRequest(model_name=model, **fields)  # type: ignore[arg-type]
    request.inputs.add(name="image", datatype="BYTES", shape=[count])
    request.raw_input_contents.append(raw_bytes_elements([digit_png(i)[0] for i in range(count)]))
    return request


def is_fresh_id(value: str) -> bool:
    """An id the gateway made: 32 lower-case hex digits."""
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


# --- HTTP ---


async def test_http_inference_record_carries_every_field(
    http: httpx.AsyncClient, access: pytest.LogCaptureFixture
) -> None:
    pixels, _ = digit_pixels(range(3))
    reply = await http.post(
        "/v2/models/convnet/infer",
        json=labels_request_json(pixels),
        headers={REQUEST_ID_HEADER: "client-7f3a"},
    )
    assert reply.status_code == 200
    assert reply.headers[REQUEST_ID_HEADER] == "client-7f3a"
    record = only(access, "client-7f3a")
    fields = record.__dict__
    assert fields["transport"] == "http"
    assert fields["method"] == "POST /v2/models/convnet/infer"
    assert fields["status"] == "200"
    assert (fields["model"], fields["version"], fields["items"]) == ("convnet", "1", 3)
    assert fields["batch_size"] == 3
    assert 0 <= fields["queue_ms"] <= fields["latency_ms"]
    assert record.levelno == logging.INFO
    # The text line names them too, for a reader without a JSON collector.
    line = record.getMessage()
    assert line.startswith("client-7f3a http 'POST /v2/models/convnet/infer' 200 model=convnet")
    assert "items=3" in line and "batch_size=3" in line


async def test_http_oip_id_names_the_request_when_no_header_does(
    http: httpx.AsyncClient, access: pytest.LogCaptureFixture
) -> None:
    pixels, _ = digit_pixels([0])
    body = {**labels_request_json(pixels), "id": "oip-42"}
    reply = await http.post("/v2/models/convnet/infer", json=body)
    assert reply.status_code == 200
    assert reply.json()["id"] == "oip-42"
    assert reply.headers[REQUEST_ID_HEADER] == "oip-42"
    assert only(access, "oip-42").status == "200"
    # A header wins over the OIP id.
    reply = await http.post(
        "/v2/models/convnet/infer", json=body, headers={REQUEST_ID_HEADER: "from-header"}
    )
    assert reply.headers[REQUEST_ID_HEADER] == "from-header"
    assert reply.json()["id"] == "oip-42"  # echoed as ever


@pytest.mark.parametrize(
    "sent",
    ["x" * (MAX_REQUEST_ID_CHARS + 1), "two words", "tab\there", "é-accented", ""],
    ids=["too-long", "space", "control", "non-ascii", "empty"],
)
async def test_http_bad_request_id_is_replaced_never_refused(
    http: httpx.AsyncClient, access: pytest.LogCaptureFixture, sent: str
) -> None:
    pixels, _ = digit_pixels([1])
    reply = await http.post(
        "/v2/models/convnet/infer",
        json=labels_request_json(pixels),
        headers=[(REQUEST_ID_HEADER.encode(), sent.encode())],
    )
    assert reply.status_code == 200
    fresh = reply.headers[REQUEST_ID_HEADER]
    assert is_fresh_id(fresh)
    assert only(access, fresh).items == 1


async def test_http_longest_request_id_is_kept(
    http: httpx.AsyncClient, access: pytest.LogCaptureFixture
) -> None:
    sent = "~" * MAX_REQUEST_ID_CHARS
    reply = await http.get("/v2/health/live", headers={REQUEST_ID_HEADER: sent})
    assert reply.headers[REQUEST_ID_HEADER] == sent
    assert only(access, sent).method == "GET /v2/health/live"


async def test_http_every_route_is_recorded_errors_too(
    http: httpx.AsyncClient, access: pytest.LogCaptureFixture
) -> None:
    png, _ = digit_png(5)
    answers = [
        await http.post("/predict/convnet", content=png),
        await http.get("/v2"),
        await http.get("/no/such/route"),
        await http.post("/v2/models/nope/infer", json={"inputs": []}),
        await http.post("/v2/models/convnet/infer", content=b"{not json"),
        await http.post("/v2/models/bad%0Aname/infer", json={"inputs": []}),
    ]
    ids = [a.headers[REQUEST_ID_HEADER] for a in answers]
    assert len(set(ids)) == len(ids)
    seen = {i: only(access, i) for i in ids}
    got = [(seen[i].method, seen[i].status, seen[i].model) for i in ids]
    assert got == [
        ("POST /predict/convnet", "200", "convnet"),
        ("GET /v2", "200", None),
        ("GET /no/such/route", "404", None),
        ("POST /v2/models/nope/infer", "404", "nope"),
        ("POST /v2/models/convnet/infer", "400", None),
        # The raw target: a newline a caller escapes never reaches the line as one.
        ("POST /v2/models/bad%0Aname/infer", "404", "'bad\\nname'"),
    ]
    assert seen[ids[0]].batch_size == 1


# --- gRPC ---


async def test_grpc_inference_record_and_id_in_initial_metadata(
    stub: pb_grpc.GRPCInferenceServiceStub, access: pytest.LogCaptureFixture
) -> None:
    call = stub.ModelInfer(image_request(2), metadata=((REQUEST_ID_HEADER, "grpc-1"),))
    response = await call
    assert len(response.outputs) > 0
    assert (REQUEST_ID_HEADER, "grpc-1") in tuple(await call.initial_metadata())
    fields = only(access, "grpc-1").__dict__
    assert fields["transport"] == "grpc"
    assert fields["method"] == "/inference.GRPCInferenceService/ModelInfer"
    assert (fields["status"], fields["model"], fields["version"]) == ("OK", "convnet", "1")
    assert (fields["items"], fields["batch_size"]) == (2, 2)


async def test_grpc_failure_returns_the_id_in_trailing_metadata(
    stub: pb_grpc.GRPCInferenceServiceStub, access: pytest.LogCaptureFixture
) -> None:
    call = stub.ModelInfer(image_request(1, model="nope", id="oip-missing"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    # No metadata id: the OIP id names the request, on the way back too.
    assert (REQUEST_ID_HEADER, "oip-missing") in tuple(raised.value.trailing_metadata() or ())
    record = only(access, "oip-missing")
    assert (record.status, record.model) == ("NOT_FOUND", "nope")


async def test_grpc_bad_metadata_id_is_replaced(
    stub: pb_grpc.GRPCInferenceServiceStub, access: pytest.LogCaptureFixture
) -> None:
    call = stub.ServerLive(
        pb.ServerLiveRequest(), metadata=((REQUEST_ID_HEADER, "y" * (MAX_REQUEST_ID_CHARS + 1)),)
    )
    assert (await call).live
    (fresh,) = [v for k, v in await call.initial_metadata() if k == REQUEST_ID_HEADER]
    assert isinstance(fresh, str) and is_fresh_id(fresh)
    assert only(access, fresh).method.endswith("/ServerLive")


async def test_grpc_concurrent_calls_report_the_batch_they_shared(
    stub: pb_grpc.GRPCInferenceServiceStub, access: pytest.LogCaptureFixture
) -> None:
    """Four calls of 1, 2, 3 and 4 images within the batch delay run as one batch of 10."""
    await asyncio.gather(
        *(
            stub.ModelInfer(image_request(n), metadata=((REQUEST_ID_HEADER, f"batched-{n}"),))
            for n in (1, 2, 3, 4)
        )
    )
    got = {n: only(access, f"batched-{n}") for n in (1, 2, 3, 4)}
    assert {r.batch_size for r in got.values()} == {10}
    assert [got[n].items for n in (1, 2, 3, 4)] == [1, 2, 3, 4]
    # The first waited in the queue for the others to come; none waited past its latency.
    assert all(0 <= r.queue_ms <= r.latency_ms for r in got.values())


async def test_grpc_stream_records_each_request(
    stub: pb_grpc.GRPCInferenceServiceStub, access: pytest.LogCaptureFixture
) -> None:
    requests = [image_request(1, id="s-ok"), image_request(1, model="nope", id="s-bad")]
    call = stub.ModelStreamInfer(iter(requests), metadata=((REQUEST_ID_HEADER, "stream-1"),))
    answers = [a async for a in call]
    assert len(answers) == 2
    assert (REQUEST_ID_HEADER, "stream-1") in tuple(await call.initial_metadata())
    assert (only(access, "s-ok").status, only(access, "s-ok").model) == ("OK", "convnet")
    assert only(access, "s-bad").status == "NOT_FOUND"
    assert only(access, "stream-1").status == "OK"


# --- off ---


async def test_access_log_off_writes_nothing_but_ids_still_return(
    model_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = gateway_settings(model_repository)
    assert settings.access_log is False
    with caplog.at_level(logging.INFO, logger=ACCESS):
        async with running_gateway(settings) as gateway:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as c:
                reply = await c.get("/v2/health/live", headers={REQUEST_ID_HEADER: "quiet"})
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
                call = pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(
                    pb.ServerLiveRequest(), metadata=((REQUEST_ID_HEADER, "quiet-grpc"),)
                )
                await call
                metadata = tuple(await call.initial_metadata())
    assert reply.headers[REQUEST_ID_HEADER] == "quiet"
    assert (REQUEST_ID_HEADER, "quiet-grpc") in metadata
    assert records(caplog) == []
