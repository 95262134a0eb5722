"""One image sent to TorchServe's ``/predictions/{model}`` and the gateway's ``/predict/{model}``.

Both answer with :func:`cnnserve.models.semantics.render_reply`. This checks the two paths to
it — the handler on a direct image, and the gateway's route over the ``torchserve`` backend
(the same TorchServe, so the same network and numbers) — give it the same output and the
same options, and pass its bytes on untouched: same status, media type, headers and body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from cnnserve.gateway.server import Gateway
from cnnserve.models.semantics import FORMAT_OPTION, PIXEL_COUNTS_HEADER, TOP_K_OPTION, Option
from tests.conftest import RunningTorchServe
from tests.gateway.harness import running_gateway
from tests.images import digit_png, shapes_png

pytestmark = [pytest.mark.torchserve, pytest.mark.asyncio(loop_scope="module")]

SCENE, _ = shapes_png(3, 64)
#: ``(model, image, options)``: options go to the gateway as query parameters and to
#: TorchServe as headers (it drops query parameters).
CASES = [
    ("convnet", digit_png(7)[0], {}),
    ("convnet", digit_png(2, invert=True)[0], {TOP_K_OPTION: "10"}),
    ("fcn", SCENE, {}),
    ("fcn", SCENE, {FORMAT_OPTION: "json"}),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(torchserve: RunningTorchServe, model_repository: Path) -> AsyncIterator[Gateway]:
    """A gateway whose batches run on the session's TorchServe."""
    settings = torchserve.gateway_settings(model_repository, drain_grace_s=10.0)
    async with running_gateway(settings) as running:
        yield running


@pytest.mark.parametrize(("model", "image", "options"), CASES)
async def test_torchserve_and_the_gateway_answer_the_same_bytes(
    torchserve: RunningTorchServe,
    gateway: Gateway,
    model: str,
    image: bytes,
    options: dict[Option, str],
) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        direct = await http.post(
            f"{torchserve.rest_url}/predictions/{model}",
            content=image,
            headers={
                "Authorization": f"Bearer {torchserve.inference_key}",
                **{option.header: value for option, value in options.items()},
            },
        )
        friendly = await http.post(
            f"http://127.0.0.1:{gateway.http_port}/predict/{model}",
            content=image,
            params={option.name: value for option, value in options.items()},
        )
    assert direct.status_code == friendly.status_code == 200, (direct.text, friendly.text)
    assert direct.headers["content-type"] == friendly.headers["content-type"]
    assert direct.headers.get(PIXEL_COUNTS_HEADER) == friendly.headers.get(PIXEL_COUNTS_HEADER)
    assert direct.content == friendly.content
