"""The HTTP transport over a real socket (uvicorn on a free port), called with httpx.

Every route, each row of the error table, JSON and binary tensors, the friendly image
routes, and the unmodified ``tritonclient`` HTTP client.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from cnnserve.errors import GENERIC_INTERNAL_MESSAGE
from cnnserve.gateway.server import Gateway
from cnnserve.models.semantics import DEFAULT_TOP_K, PIXEL_COUNTS_HEADER
from tests.gateway.harness import (
    ExplodingBackend,
    digit_input,
    digit_pixels,
    exploding_core,
    gateway_settings,
    holding_settings,
    labels_request_json,
    raw_bytes_elements,
    running_gateway,
    wait_for_metric,
)
from tests.images import digit_png, shapes_png

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_BODY = 512 * 1024


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(model_repository: Path) -> AsyncIterator[Gateway]:
    """One onnxruntime gateway for the module, with a small body limit to test against."""
    settings = gateway_settings(
        model_repository, max_message_bytes=MAX_BODY, max_batch_delay_ms=5.0
    )
    async with running_gateway(settings) as running:
        yield running


def _error(reply: httpx.Response, status: int) -> str:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"}
    return str(body["error"])


def _binary_image_body(pngs: list[bytes], outputs: list[dict[str, object]]) -> tuple[bytes, int]:
    raw = raw_bytes_elements(pngs)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [len(pngs)],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": outputs,
        }
    ).encode()
    return header + raw, len(header)


# --- health and metadata ---


async def test_health(http: httpx.AsyncClient) -> None:
    live = await http.get("/v2/health/live")
    assert (live.status_code, live.json()) == (200, {"live": True})
    ready = await http.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    for path in ("/v2/models/convnet/ready", "/v2/models/fcn/versions/1/ready"):
        reply = await http.get(path)
        assert reply.status_code == 200
        assert reply.json()["ready"] is True
    assert "served models are: convnet, fcn" in _error(
        await http.get("/v2/models/resnet/ready"), 404
    )


async def test_metadata(http: httpx.AsyncClient) -> None:
    server = (await http.get("/v2")).json()
    assert server["name"] == "cnnserve"
    assert set(server["extensions"]) >= {"binary_tensor_data", "classification"}
    convnet = (await http.get("/v2/models/convnet")).json()
    assert convnet["versions"] == ["1"]
    assert {i["name"]: i["shape"] for i in convnet["inputs"]} == {
        "input": [-1, 3, 28, 28],
        "pixels": [-1, 3, 28, 28],
        "image": [-1, 1],
    }
    fcn = (await http.get("/v2/models/fcn/versions/1")).json()
    assert {o["name"]: o["datatype"] for o in fcn["outputs"]} == {
        "scores": "FP32",
        "mask": "UINT8",
        "counts": "INT64",
        **dict.fromkeys(("conv1", "conv2", "conv3", "unsample1", "unsample2"), "FP32"),
    }
    _error(await http.get("/v2/models/fcn/versions/2"), 404)


# --- inference ---


async def test_json_infer_flat_and_nested(http: httpx.AsyncClient) -> None:
    pixels, labels = digit_pixels([0, 1])
    results = []
    for data in (pixels.ravel().tolist(), pixels.tolist()):
        body = {
            "id": "j",
            "inputs": [
                {"name": "pixels", "datatype": "UINT8", "shape": [2, 3, 28, 28], "data": data}
            ],
            "outputs": [{"name": "labels"}, {"name": "logits"}],
        }
        reply = await http.post("/v2/models/convnet/infer", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"] == "application/json"
        results.append(reply.json())
    assert results[0] == results[1]
    document = results[0]
    assert (document["model_name"], document["model_version"], document["id"]) == (
        "convnet",
        "1",
        "j",
    )
    outputs = {o["name"]: o for o in document["outputs"]}
    assert outputs["labels"]["data"] == [str(label) for label in labels]
    assert outputs["logits"]["shape"] == [2, 10]
    assert len(outputs["logits"]["data"]) == 20


async def test_binary_tensor_extension_in_and_out(http: httpx.AsyncClient) -> None:
    pngs = [digit_png(i) for i in range(3)]
    body, header_length = _binary_image_body(
        [png for png, _ in pngs],
        [{"name": "labels"}, {"name": "probabilities", "parameters": {"binary_data": True}}],
    )
    reply = await http.post(
        "/v2/models/convnet/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(header_length)},
    )
    assert reply.status_code == 200, reply.text
    json_length = int(reply.headers["Inference-Header-Content-Length"])
    header = json.loads(reply.content[:json_length])
    labels, probabilities = header["outputs"]
    assert labels["data"] == [str(label) for _, label in pngs]
    size = probabilities["parameters"]["binary_data_size"]
    assert size == 3 * 10 * 4 == len(reply.content) - json_length
    values = np.frombuffer(reply.content[json_length:], dtype="<f4").reshape(3, 10)
    np.testing.assert_allclose(values.sum(axis=1), 1.0, rtol=1e-5)
    assert values.argmax(axis=1).tolist() == [label for _, label in pngs]


async def test_binary_data_output_sends_every_output_binary(http: httpx.AsyncClient) -> None:
    tensor, _ = digit_input([4])
    header = json.dumps(
        {
            "parameters": {"binary_data_output": True},
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 3, 28, 28],
                    "parameters": {"binary_data_size": tensor.nbytes},
                }
            ],
        }
    ).encode()
    reply = await http.post(
        "/v2/models/convnet/versions/1/infer",
        content=header + tensor.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert reply.status_code == 200, reply.text
    json_length = int(reply.headers["Inference-Header-Content-Length"])
    outputs = json.loads(reply.content[:json_length])["outputs"]
    assert all("data" not in o for o in outputs)
    sizes = [o["parameters"]["binary_data_size"] for o in outputs]
    assert sum(sizes) == len(reply.content) - json_length


async def test_gzip_body(http: httpx.AsyncClient) -> None:
    pixels, labels = digit_pixels([6])
    body = {
        "inputs": [
            {
                "name": "pixels",
                "datatype": "UINT8",
                "shape": [1, 3, 28, 28],
                "data": pixels.ravel().tolist(),
            }
        ],
        "outputs": [{"name": "labels"}],
    }
    reply = await http.post(
        "/v2/models/convnet/infer",
        content=gzip.compress(json.dumps(body).encode()),
        headers={"Content-Encoding": "gzip"},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["outputs"][0]["data"] == [str(labels[0])]


async def test_uneven_concurrent_requests(http: httpx.AsyncClient) -> None:
    sizes, starts = (2, 3, 1), (0, 2, 5)
    _, labels = digit_pixels(range(6))

    async def call(start: int, size: int) -> list[str]:
        pixels, _ = digit_pixels(range(start, start + size))
        body = labels_request_json(pixels)
        reply = await http.post("/v2/models/convnet/infer", json=body)
        assert reply.status_code == 200, reply.text
        return list(reply.json()["outputs"][0]["data"])

    answers = await asyncio.gather(*(call(s, n) for s, n in zip(starts, sizes, strict=True)))
    assert [label for answer in answers for label in answer] == [str(x) for x in labels]


# --- friendly routes ---


async def test_predict_convnet_raw_body(http: httpx.AsyncClient) -> None:
    png, label = digit_png(7)
    reply = await http.post("/predict/convnet", content=png, headers={"Content-Type": "image/png"})
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/json"
    (prediction,) = reply.json()["predictions"]
    assert prediction["label"] == str(label)
    assert len(prediction["top_k"]) == DEFAULT_TOP_K
    best = prediction["top_k"][0]
    assert (best["label"], best["index"]) == (str(label), label)
    probabilities = [p["probability"] for p in prediction["top_k"]]
    assert probabilities == sorted(probabilities, reverse=True)


async def test_predict_convnet_multipart_files(http: httpx.AsyncClient) -> None:
    digits = [digit_png(i) for i in (8, 9)]
    files = [("file", (f"d{i}.png", png, "image/png")) for i, (png, _) in enumerate(digits)]
    reply = await http.post("/predict/convnet", files=files, params={"top_k": 1})
    assert reply.status_code == 200, reply.text
    predictions = reply.json()["predictions"]
    assert [p["label"] for p in predictions] == [str(label) for _, label in digits]
    assert all(len(p["top_k"]) == 1 for p in predictions)


async def test_predict_fcn_mask_png_and_counts(http: httpx.AsyncClient) -> None:
    png, truth = shapes_png(2, side=40)
    reply = await http.post("/predict/fcn", content=png)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "image/png"
    mask = Image.open(io.BytesIO(reply.content))
    assert mask.mode == "P"
    classes = np.asarray(mask)
    assert classes.shape == truth.shape
    assert classes.max() < 4
    counts = json.loads(reply.headers[PIXEL_COUNTS_HEADER])
    reply = await http.post("/predict/fcn", content=png, params={"format": "json"})
    assert reply.status_code == 200, reply.text
    (prediction,) = reply.json()["predictions"]
    assert prediction == {"counts": counts}
    assert list(counts) == ["background", "solid", "outline", "striped"]
    assert sum(counts.values()) == 40 * 40
    assert counts["background"] == int((classes == 0).sum())


async def test_predict_refusals(http: httpx.AsyncClient) -> None:
    assert "could not decode image" in _error(
        await http.post("/predict/convnet", content=b"hi"), 400
    )
    refused = await http.post("/predict/convnet", content=digit_png(0)[0], params={"top_k": 0})
    assert _error(refused, 400) == "top_k must be an integer ≥ 1, got '0'"
    refused = await http.post("/predict/fcn", content=digit_png(0)[0], params={"format": "gif"})
    assert _error(refused, 400) == "format must be png or json, got 'gif'"
    png, _ = shapes_png(1)
    files = [("a", ("a.png", png, "image/png")), ("b", ("b.png", png, "image/png"))]
    assert "a PNG answer holds one mask" in _error(
        await http.post("/predict/fcn", files=files), 400
    )
    _error(await http.post("/predict/resnet", content=png), 404)


# --- the error table ---


async def test_bad_input_is_400(http: httpx.AsyncClient) -> None:
    assert "not valid JSON" in _error(
        await http.post("/v2/models/convnet/infer", content=b"{"), 400
    )
    wrong = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}
        ]
    }
    assert _error(await http.post("/v2/models/convnet/infer", json=wrong), 400) == (
        "convnet expects FP32 [N,3,28,28], got FP32 [1,3,32,32]"
    )
    body, header_length = _binary_image_body([digit_png(0)[0]], [])
    reply = await http.post(
        "/v2/models/convnet/infer",
        content=body[:-5],
        headers={"Inference-Header-Content-Length": str(header_length)},
    )
    assert "declares" in _error(reply, 400)
    reply = await http.post(
        "/v2/models/convnet/infer", content=b"{}", headers={"Content-Encoding": "br"}
    )
    assert "Content-Encoding 'br' is not accepted" in _error(reply, 400)


async def test_unknown_model_and_route_are_404(http: httpx.AsyncClient) -> None:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
    assert "unknown model 'resnet'" in _error(
        await http.post("/v2/models/resnet/infer", json=body), 404
    )
    _error(await http.get("/v3/nothing"), 404)


async def test_body_over_the_limit_is_413(http: httpx.AsyncClient) -> None:
    big = b"\0" * (MAX_BODY + 1)
    assert "over the limit" in _error(await http.post("/v2/models/convnet/infer", content=big), 413)

    async def chunks() -> AsyncIterator[bytes]:
        # Streamed without Content-Length: refused while reading, not after.
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"\0" * 65536

    assert "over the limit" in _error(await http.post("/predict/convnet", content=chunks()), 413)
    bomb = gzip.compress(b"\0" * (4 * MAX_BODY))
    assert len(bomb) < MAX_BODY
    reply = await http.post(
        "/v2/models/convnet/infer", content=bomb, headers={"Content-Encoding": "gzip"}
    )
    assert "decompressed request body is over the limit" in _error(reply, 413)


async def test_queue_full_is_429_and_timeout_is_504(model_repository: Path) -> None:
    settings = holding_settings(model_repository, 1500.0, max_batch_size=8, max_queue_size=4)
    async with (
        running_gateway(settings) as gateway,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http,
    ):

        def body(n: int, **parameters: int) -> dict[str, object]:
            return {
                "parameters": parameters,
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "UINT8",
                        "shape": [n, 3, 28, 28],
                        "data": [0] * (n * 2352),
                    }
                ],
            }

        waiting = asyncio.ensure_future(http.post("/v2/models/convnet/infer", json=body(3)))
        await wait_for_metric(gateway.metrics_port, "cnnserve_queue_depth", 3, model="convnet")
        assert "overloaded" in _error(
            await http.post("/v2/models/convnet/infer", json=body(2)), 429
        )
        timed_out = await http.post("/v2/models/convnet/infer", json=body(1, timeout=50_000))
        assert "deadline exceeded" in _error(timed_out, 504)
        assert (await waiting).status_code == 200


async def test_draining_is_503(model_repository: Path) -> None:
    async with (
        running_gateway(gateway_settings(model_repository)) as gateway,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http,
    ):
        gateway.core.begin_drain()
        ready = await http.get("/v2/health/ready")
        assert (ready.status_code, ready.json()) == (503, {"ready": False})
        assert (await http.get("/v2/models/convnet/ready")).status_code == 503
        assert (await http.get("/v2/health/live")).status_code == 200
        reply = await http.post("/predict/convnet", content=digit_png(0)[0])
        assert "not accepting requests" in _error(reply, 503)


async def test_unexpected_failure_is_500_without_details(
    model_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = gateway_settings(model_repository)
    async with (
        running_gateway(settings, exploding_core(settings)) as gateway,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http,
    ):
        reply = await http.post("/predict/convnet", content=digit_png(0)[0])
    assert _error(reply, 500) == GENERIC_INTERNAL_MESSAGE
    assert ExplodingBackend.SECRET not in reply.text
    assert ExplodingBackend.SECRET in caplog.text


# --- a standard client, unmodified ---


def _tritonclient_session(url: str, pngs: list[bytes]) -> dict[str, object]:
    """Drive the gateway with tritonclient.http (blocking; runs in a worker thread)."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url)
    out: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("convnet"),
        "platform": client.get_model_metadata("convnet")["platform"],
    }
    images = httpclient.InferInput("image", [len(pngs)], "BYTES")
    images.set_data_from_numpy(np.array(pngs, dtype=np.object_), binary_data=True)
    wanted = [
        httpclient.InferRequestedOutput("labels", binary_data=True),
        httpclient.InferRequestedOutput("probabilities", binary_data=False),
    ]
    result = client.infer("convnet", [images], outputs=wanted)
    out["labels"] = [row[0].decode() for row in result.as_numpy("labels")]
    out["probabilities_shape"] = list(result.as_numpy("probabilities").shape)
    pixels = httpclient.InferInput("pixels", [1, 3, 28, 28], "UINT8")
    pixels.set_data_from_numpy(np.zeros((1, 3, 28, 28), dtype=np.uint8), binary_data=False)
    defaults = client.infer("convnet", [pixels])  # no outputs named: binary_data_output
    out["default_outputs"] = sorted(o["name"] for o in defaults.get_response()["outputs"])
    try:
        client.infer("resnet", [pixels])
    except InferenceServerException as exc:
        out["error"] = (exc.status(), exc.message())
    client.close()
    return out


async def test_tritonclient_http_works_unmodified(gateway: Gateway) -> None:
    digits = [digit_png(i) for i in (3, 4, 5)]
    out = await asyncio.to_thread(
        _tritonclient_session, f"127.0.0.1:{gateway.http_port}", [png for png, _ in digits]
    )
    assert (out["live"], out["ready"], out["model_ready"]) == (True, True, True)
    assert out["platform"] == "onnxruntime_onnx"
    assert out["labels"] == [str(label) for _, label in digits]
    assert out["probabilities_shape"] == [3, 10]
    assert out["default_outputs"] == ["labels", "probabilities"]
    status, message = out["error"]  # type: ignore[misc]
    assert status == "404"
    assert "unknown model 'resnet'" in message


async def test_empty_content_encoding_is_identity(http: httpx.AsyncClient) -> None:
    """Regression (found by tests/gateway/test_bad_input.py's header fuzzer): an empty
    Content-Encoding lists no coding, so the body is read as sent instead of refused."""
    pixels, labels = digit_pixels([6])
    tensor = {"name": "pixels", "datatype": "UINT8", "shape": [1, 3, 28, 28]}
    body = {
        "inputs": [{**tensor, "data": pixels.ravel().tolist()}],
        "outputs": [{"name": "labels"}],
    }
    reply = await http.post(
        "/v2/models/convnet/infer",
        content=json.dumps(body).encode(),
        headers={"Content-Encoding": ""},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["outputs"][0]["data"] == [str(labels[0])]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("DELETE", "/v2/models/convnet/infer", "POST"), ("TRACE", "/v2/health/ready", "GET")],
)
async def test_method_not_allowed_names_the_allowed_ones(
    http: httpx.AsyncClient, method: str, path: str, allowed: str
) -> None:
    """Regression (schemathesis, tests/gateway/test_openapi.py): a 405 carries the Allow
    header RFC 9110 requires; the gateway's error handler used to drop it."""
    reply = await http.request(method, path)
    assert _error(reply, 405) == "Method Not Allowed"
    assert reply.headers["allow"] == allowed
