"""The routes that draw what the networks see, on a real onnxruntime gateway at its default
settings, called over HTTP: a layer's feature maps (``POST /predict/{model}/features``), the
input's channels (``layer=rgb``), the demo scenes (``GET /demo/scene.png``), their refusals
and their description. The pictures are read back with Pillow (:func:`tests.images.grid_tiles`).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from cnnserve.gateway.http_api import MAX_SCENE_SEED
from cnnserve.gateway.pictures import DRAWING_BYTES, MAX_GRID_PIXELS, MAX_TILE_SIDE, layer_picture
from cnnserve.gateway.server import Gateway
from cnnserve.models.features import FEATURE_LAYERS, layer_shape
from cnnserve.models.registry import get_spec
from cnnserve.models.scenes import MIN_SCENE_SIDE, shapes_scene
from cnnserve.models.spec import FCN_MAX_SIDE
from tests.gateway.harness import gateway_settings, labels_request_json, running_gateway
from tests.images import digit_png, encode, grid_tiles, shapes_png

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(model_repository: Path) -> AsyncIterator[Gateway]:
    """One onnxruntime gateway for the module, at the default settings."""
    async with running_gateway(gateway_settings(model_repository)) as running:
        yield running


def _error(reply: httpx.Response, status: int) -> str:
    assert reply.status_code == status, reply.text
    return str(reply.json()["error"])


async def _picture(
    http: httpx.AsyncClient, model: str, png: bytes, **params: str
) -> list[np.ndarray]:
    """POST ``png`` to the features route: the tiles of the answer (checked to be a PNG)."""
    reply = await http.post(f"/predict/{model}/features", content=png, params=params)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "image/png"
    return grid_tiles(reply.content, reply.headers)


async def _oip_maps(
    http: httpx.AsyncClient, model: str, pixels: np.ndarray, layer: str
) -> np.ndarray:
    """One item's ``layer`` asked for through the Open Inference Protocol's REST route, from
    the network pixels the features route makes of an image."""
    body = {**labels_request_json(pixels[None]), "outputs": [{"name": layer}]}
    reply = await http.post(f"/v2/models/{model}/infer", json=body)
    assert reply.status_code == 200, reply.text
    (output,) = reply.json()["outputs"]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])[0]


# --- the input's channels ---


async def test_rgb_draws_the_digit_as_the_convnet_is_given_it(http: httpx.AsyncClient) -> None:
    png, _ = digit_png(4, invert=True)  # dark ink on white: the network gets it inverted
    pixels = get_spec("convnet").image_to_pixels(png)
    tiles = await _picture(http, "convnet", png, layer="rgb")
    assert len(tiles) == 3
    for channel, tile in zip(pixels, tiles, strict=True):
        assert np.array_equal(np.repeat(np.repeat(channel, 2, 0), 2, 1), tile)


async def test_rgb_of_a_scene_is_its_three_channels(http: httpx.AsyncClient) -> None:
    image, _ = shapes_scene(np.random.default_rng(3), 48)
    files = {"file": ("scene.png", encode(image), "image/png")}
    reply = await http.post("/predict/fcn/features", files=files, params={"layer": "rgb"})
    assert reply.status_code == 200, reply.text
    assert reply.headers["X-Layer-Shape"] == "3,48,48"
    tiles = grid_tiles(reply.content, reply.headers)
    for index, tile in enumerate(tiles):
        assert np.array_equal(tile, image[..., index])


# --- feature maps ---


@pytest.mark.parametrize("layer", FEATURE_LAYERS[get_spec("convnet").architecture])
async def test_each_convnet_layer_draws_what_the_protocol_answers(
    http: httpx.AsyncClient, layer: str
) -> None:
    png, _ = digit_png(2)
    pixels = get_spec("convnet").image_to_pixels(png)
    reply = await http.post("/predict/convnet/features", content=png, params={"layer": layer})
    assert reply.status_code == 200, reply.text
    shape = layer_shape(get_spec("convnet").architecture, layer, 28, 28)
    assert reply.headers["X-Layer-Shape"] == ",".join(map(str, shape))
    tiles = grid_tiles(reply.content, reply.headers)
    maps = await _oip_maps(http, "convnet", pixels, layer)
    expected = layer_picture(maps)
    assert len(tiles) == (shape[0] if len(shape) == 3 else 1)
    for tile, want in zip(tiles, grid_tiles(expected.png, expected.headers()), strict=True):
        assert np.abs(tile.astype(int) - want).max() <= 1
        assert tile.max() == 0 or (tile.min(), tile.max()) == (0, 255)


@pytest.mark.parametrize("layer", FEATURE_LAYERS[get_spec("fcn").architecture])
async def test_each_fcn_layer_draws_what_the_protocol_answers(
    http: httpx.AsyncClient, layer: str
) -> None:
    png, _ = shapes_png(5, 32)
    pixels = get_spec("fcn").image_to_pixels(png)
    tiles = await _picture(http, "fcn", png, layer=layer, version="1")
    maps = await _oip_maps(http, "fcn", pixels, layer)
    assert maps.shape == layer_shape(get_spec("fcn").architecture, layer, 32, 32)
    assert len(tiles) == len(maps)
    flat = maps.reshape(len(maps), -1)
    for tile, constant in zip(tiles, flat.min(1) == flat.max(1), strict=True):
        # After a ReLU a map may be 0 throughout: black; any other spans black to white.
        assert (tile.min(), tile.max()) == ((0, 0) if constant else (0, 255))


async def test_a_large_fcn_image_is_drawn_in_shrunk_tiles(http: httpx.AsyncClient) -> None:
    """400×400: its maps are 3× the largest tile (at the default settings a 512×512 image's
    feature maps are over a batch's working memory, max_batch_model_bytes)."""
    png, _ = shapes_png(6, 400)
    reply = await http.post("/predict/fcn/features", content=png, params={"layer": "conv1"})
    assert reply.status_code == 200, reply.text
    assert reply.headers["X-Layer-Shape"] == "32,398,398"
    assert reply.headers["X-Tile-Shape"] == f"{MAX_TILE_SIDE},{MAX_TILE_SIDE}"
    grid = Image.open(io.BytesIO(reply.content))
    assert grid.width * grid.height <= MAX_GRID_PIXELS
    tiles = grid_tiles(reply.content, reply.headers)
    assert len(tiles) == 32
    assert all(tile.max() == 0 or (tile.min(), tile.max()) == (0, 255) for tile in tiles)


# --- refusals ---


async def test_an_unknown_layer_is_refused_naming_the_valid_ones(http: httpx.AsyncClient) -> None:
    png, _ = digit_png(1)
    reply = await http.post("/predict/convnet/features", content=png, params={"layer": "conv3"})
    assert _error(reply, 400) == (
        "unknown layer 'conv3' for convnet; valid layers: rgb, conv1, pool1, conv2, pool2, fc1"
    )
    reply = await http.post("/predict/fcn/features", content=png, params={"layer": "fc1"})
    assert _error(reply, 400) == (
        "unknown layer 'fc1' for fcn; valid layers: rgb, conv1, conv2, conv3, unsample1, unsample2"
    )
    reply = await http.post("/predict/convnet/features", content=png)
    assert "layer" in _error(reply, 400)


async def test_refusals(http: httpx.AsyncClient) -> None:
    png, _ = digit_png(1)
    files = [("a", ("a.png", png, "image/png")), ("b", ("b.png", png, "image/png"))]
    for layer in ("rgb", "conv1"):
        reply = await http.post("/predict/convnet/features", files=files, params={"layer": layer})
        assert _error(reply, 400) == "a picture is drawn of one image; got 2"
        reply = await http.post(
            "/predict/convnet/features", content=b"not an image", params={"layer": layer}
        )
        assert "could not decode image" in _error(reply, 400)
        small = encode(np.zeros((5, 5, 3), dtype=np.uint8))
        reply = await http.post("/predict/fcn/features", content=small, params={"layer": layer})
        assert "fcn expects" in _error(reply, 400)
    reply = await http.post("/predict/resnet/features", content=png, params={"layer": "rgb"})
    assert "unknown model 'resnet'" in _error(reply, 404)
    reply = await http.post(
        "/predict/convnet/features", content=png, params={"layer": "rgb", "version": "9"}
    )
    assert "has no version '9'" in _error(reply, 404)


async def test_drawing_is_refused_before_it_starts_when_its_memory_is_over_the_budget(
    model_repository: Path,
) -> None:
    """The drawing's working memory (and the maps, or the image's decode) is reserved in the
    memory budget before anything is drawn: a gateway whose requests may hold less refuses."""
    limit = DRAWING_BYTES // 2
    settings = gateway_settings(model_repository, max_request_bytes=limit)
    png, _ = digit_png(1)
    async with (
        running_gateway(settings) as small,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{small.http_port}") as client,
    ):
        assert (await client.post("/predict/convnet", content=png)).status_code == 200
        for layer, what in (("rgb", "this picture"), ("pool2", "this picture of pool2")):
            reply = await client.post(
                "/predict/convnet/features", content=png, params={"layer": layer}
            )
            message = _error(reply, 400)
            assert message.startswith(f"{what} would take "), message
            assert "(max_request_bytes)" in message


# --- demo scenes ---


async def test_a_demo_scene_is_the_generators_and_the_fcn_takes_it(
    http: httpx.AsyncClient,
) -> None:
    reply = await http.get("/demo/scene.png", params={"seed": 11})
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(reply.content)))
    expected, _ = shapes_scene(np.random.default_rng(11), 64)
    assert np.array_equal(image, expected)
    predicted = await http.post("/predict/fcn", content=reply.content)
    assert predicted.status_code == 200, predicted.text
    for size in (MIN_SCENE_SIDE, FCN_MAX_SIDE):
        for seed in (0, MAX_SCENE_SEED):
            reply = await http.get("/demo/scene.png", params={"seed": seed, "size": size})
            assert reply.status_code == 200, reply.text
            assert Image.open(io.BytesIO(reply.content)).size == (size, size)


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"seed": "-1"},
        {"seed": str(MAX_SCENE_SEED + 1)},
        {"seed": "one"},
        {"seed": "1", "size": str(MIN_SCENE_SIDE - 1)},
        {"seed": "1", "size": str(FCN_MAX_SIDE + 1)},
    ],
)
async def test_demo_scene_refusals(http: httpx.AsyncClient, params: dict[str, str]) -> None:
    assert _error(await http.get("/demo/scene.png", params=params), 400).startswith(
        "invalid request: query."
    )


# --- description ---


async def test_the_description_says_what_the_routes_take_and_answer(
    http: httpx.AsyncClient,
) -> None:
    paths = (await http.get("/openapi.json")).json()["paths"]
    features = paths["/predict/{model}/features"]["post"]
    assert "image/png" in features["requestBody"]["content"]
    ok = features["responses"]["200"]
    assert set(ok["content"]) == {"image/png"}
    assert set(ok["headers"]) == {"X-Layer-Shape", "X-Grid-Shape", "X-Tile-Shape"}
    assert set(features["responses"]) == {"200", "400", "404", "413", "429", "500", "503", "504"}
    parameters = {p["name"]: p for p in features["parameters"]}
    assert parameters["layer"]["required"] is True
    assert "unsample2" in parameters["layer"]["description"]
    assert "one tile per channel" in features["description"]
    scene = paths["/demo/scene.png"]["get"]
    assert set(scene["responses"]["200"]["content"]) == {"image/png"}
    bounds = {p["name"]: p["schema"] for p in scene["parameters"]}
    assert (bounds["seed"]["minimum"], bounds["seed"]["maximum"]) == (0, MAX_SCENE_SEED)
    assert (bounds["size"]["minimum"], bounds["size"]["maximum"]) == (MIN_SCENE_SIDE, FCN_MAX_SIDE)
