"""The torchserve backend follows the model repository, live, behind a real gateway.

One TorchServe starts with an empty model store (tokens on); one ``cnnserve serve --backend
torchserve`` process in explicit model control mode serves a copy of the default repository
plus the tutorial's 3-class FCN and a model whose TorchScript file is broken, with only the
ConvNet loaded at start. The unmodified tritonclient loads and unloads models through Triton's
repository extension; TorchServe's management API shows what got registered.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from cnnserve.torchserve_engine.archive import store_archives
from cnnserve.torchserve_engine.process import ServerInfo, start, status, stop
from tests.conftest import torchserve_settings
from tests.models import tutorial_classes as tutorial
from tests.support import GatewayProcess, gateway_process, starts_torchserve

pytestmark = pytest.mark.torchserve

READY_TIMEOUT_S = 120.0
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Deployment:
    """TorchServe (empty at start), the repository and the gateway in front."""

    store: Path
    server: ServerInfo
    repository: Path
    gateway: GatewayProcess

    def registered(self) -> set[str]:
        """The model versions TorchServe holds now (``<name>/<version>``)."""
        return set(status(self.store).workers)

    def client(self) -> httpclient.InferenceServerClient:
        return httpclient.InferenceServerClient(
            f"127.0.0.1:{self.gateway.http_port}", network_timeout=READY_TIMEOUT_S
        )


@pytest.fixture(scope="module")
@starts_torchserve
def deployment(
    model_repository: Path, tutorial_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("torchserve_backend")
    repository = root / "repository"
    shutil.copytree(model_repository, repository)
    shutil.copytree(tutorial_repository / "fcn3", repository / "fcn3")
    shutil.copytree(model_repository / "convnet", repository / "broken")
    (repository / "broken" / "1" / "model.pt").write_bytes(b"not a TorchScript file")
    store = root / "store"
    settings = torchserve_settings(store)
    server = start(settings, store)
    try:
        with gateway_process(
            "torchserve",
            root / "gateway.log",
            READY_TIMEOUT_S,
            model_repository=repository,
            model_control_mode="explicit",
            load_models=["convnet"],
            model_store_dir=store,
            torchserve_grpc_target=server.grpc_target,
            torchserve_token_auth=True,
        ) as gateway:
            yield Deployment(store, server, repository, gateway)
    finally:
        stop(store)


def test_the_gateway_registers_what_it_loads_at_start(deployment: Deployment) -> None:
    assert deployment.server.models == ()  # TorchServe started with nothing
    assert deployment.registered() == {"convnet/1"}
    assert [p.name for p in store_archives(deployment.store)] == ["convnet.1.mar"]


def test_a_tutorial_fcn_with_3_classes_loads_serves_and_unloads(
    deployment: Deployment, tutorial_checkpoints: dict[str, Path]
) -> None:
    client = deployment.client()
    client.load_model("fcn3")
    assert deployment.registered() == {"convnet/1", "fcn3/1"}
    items = np.random.default_rng(3).uniform(-1, 1, (2, 3, 24, 40)).astype(np.float32)
    tensor = httpclient.InferInput("input", list(items.shape), "FP32")
    tensor.set_data_from_numpy(items, binary_data=True)
    result = client.infer("fcn3", [tensor], outputs=[httpclient.InferRequestedOutput("scores")])
    scores = result.as_numpy("scores")
    network = tutorial.FCN(3)
    network.load_state_dict(torch.load(tutorial_checkpoints["fcn3"], weights_only=True))
    with torch.inference_mode():
        expected = network.eval()(torch.from_numpy(items)).numpy()
    assert scores.shape == expected.shape == (2, 3, 24, 40)
    assert np.abs(scores - expected).max() < TOLERANCE
    client.unload_model("fcn3")
    assert deployment.registered() == {"convnet/1"}
    assert [p.name for p in store_archives(deployment.store)] == ["convnet.1.mar"]


def test_a_broken_version_fails_its_load_with_the_reason_and_the_others_serve(
    deployment: Deployment,
) -> None:
    client = deployment.client()
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("broken")
    assert "could not register broken version 1" in str(refused.value)
    assert "PytorchStreamReader failed reading zip archive" in str(refused.value)
    (row,) = [r for r in client.get_model_repository_index() if r["name"] == "broken"]
    assert row["state"] == "UNAVAILABLE"
    assert "the worker said" in row["reason"]
    assert deployment.registered() == {"convnet/1"}
    assert client.is_model_ready("convnet")


async def test_a_new_version_takes_over_while_the_old_one_serves(deployment: Deployment) -> None:
    """Version 2 appears; loading the model registers 2, routes to it, drains 1 and only then
    unregisters it — callers of the model never see a failure. (httpx here: tritonclient's
    HTTP client cannot be shared between the caller's loop and the load.)"""
    shutil.copytree(
        deployment.repository / "convnet" / "1", deployment.repository / "convnet" / "2"
    )
    base = f"http://127.0.0.1:{deployment.gateway.http_port}"
    body = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2, 3, 28, 28],
                        "data": [0] * (2 * 3 * 28 * 28)}]}  # fmt: skip
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=base, timeout=READY_TIMEOUT_S) as http:

        async def classify() -> str:
            reply = await http.post("/v2/models/convnet/infer", json=body)
            assert reply.status_code == 200, reply.text
            return str(reply.json()["model_version"])

        async def steady_load() -> list[str]:
            versions = [await classify()]
            while not done.is_set():
                versions.append(await classify())
            return versions

        load = asyncio.create_task(steady_load())
        loaded = await http.post("/v2/repository/models/convnet/load")
        assert loaded.status_code == 200, loaded.text
        done.set()
        answered = await load
        assert set(answered) <= {"1", "2"} and answered[0] == "1"
        assert await classify() == "2"
    assert deployment.registered() == {"convnet/2"}
    index = deployment.client().get_model_repository_index()
    ready = {(r["name"], r.get("version")) for r in index if r.get("state") == "READY"}
    assert ("convnet", "2") in ready and ("convnet", "1") not in ready
