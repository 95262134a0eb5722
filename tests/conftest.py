"""Fixtures shared across the suite: exported artifacts and a TorchServe, once per session; a
headless Chromium per test module; and the ``torchserve`` mark on every test that needs one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver

from cnnserve.export.exporter import ExportPaths, export_model
from cnnserve.export.repository import ensure_default_repository, export_to_repository
from cnnserve.models.checkpoint import load_network
from cnnserve.models.registry import MODELS, weights_path
from cnnserve.models.spec import Architecture
from cnnserve.settings import Settings
from cnnserve.torchserve_engine.archive import archive_repository
from cnnserve.torchserve_engine.keys import key_file_name
from cnnserve.torchserve_engine.process import (
    ServerInfo,
    loopback_settings,
    start,
    stop,
)
from tests.browser import chromium
from tests.models import tutorial_classes as tutorial
from tests.support import free_ports, is_torchserve_fixture, starts_torchserve


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``torchserve`` every test that uses a fixture flagged by
    :func:`~tests.support.starts_torchserve`, directly or through other fixtures."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        definitions = info.name2fixturedefs.values() if info is not None else ()
        if any(is_torchserve_fixture(d.func) for defs in definitions for d in defs):
            item.add_marker(pytest.mark.torchserve)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """A headless Chromium (tests/browser.py) for the test module, quit after it."""
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both models exported from the committed weights (TorchScript, ONNX, JSON)."""
    out = tmp_path_factory.mktemp("artifacts")
    for spec in MODELS.values():
        weights = weights_path(spec.name)
        export_model(spec, load_network(spec, weights), ExportPaths.flat(out, spec.name), weights)
    return out


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model repository (both demo models as version 1), made once per session.
    Tests that change a repository copy it first (``shutil.copytree``)."""
    root = tmp_path_factory.mktemp("repository")
    ensure_default_repository(root)
    return root


@pytest.fixture(scope="session")
def tutorial_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    r"""``state_dict``\ s saved from the tutorial's own classes, with the class counts a tutorial
    user trains: ``convnet10``, ``fcn10`` (the tutorial's ``num_class``) and ``fcn3``."""
    root = tmp_path_factory.mktemp("tutorial")
    torch.manual_seed(0)
    networks = {
        "convnet10": tutorial.ConvNet(10),
        "fcn10": tutorial.FCN(10),
        "fcn3": tutorial.FCN(3),
    }
    paths = {}
    for name, network in networks.items():
        paths[name] = root / f"{name}.pt"
        torch.save(network.state_dict(), paths[name])
    return paths


@pytest.fixture(scope="session")
def tutorial_repository(
    tutorial_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A repository holding each tutorial checkpoint as version 1 of a model of its own name
    (``convnet10``, ``fcn10``, ``fcn3``), labels ``"0"``… as export gives them."""
    root = tmp_path_factory.mktemp("tutorial_repository")
    for name, checkpoint in tutorial_checkpoints.items():
        architecture = Architecture.CONVNET if name.startswith("convnet") else Architecture.FCN
        export_to_repository(architecture, checkpoint, name, root)
    return root


def torchserve_settings(model_store: Path) -> Settings:
    """Settings for a test TorchServe on free ports, serving ``model_store`` with tokens on."""
    return loopback_settings(model_store, free_ports(6), torchserve_grpc_target=None)


@contextmanager
def running_torchserve(
    model_repository: Path, model_store: Path, settings: Settings
) -> Iterator[ServerInfo]:
    """A real TorchServe serving ``model_repository``'s TorchScript archives from
    ``model_store``, started with ``settings`` and stopped (checked gone) on exit."""
    archive_repository(model_repository, model_store, settings, "torchscript")
    server = start(settings, model_store)
    try:
        yield server
    finally:
        stop(model_store)


def served_requests(server: ServerInfo, model: str = "convnet") -> float:
    """How many ``model`` inference requests ``server`` has answered (the sum of TorchServe's
    ``ts_inference_requests_total`` samples for it, from its metrics API)."""
    reply = httpx.get(f"{server.metrics_url}/metrics", timeout=10.0)
    reply.raise_for_status()
    return sum(
        sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
        if sample.name == "ts_inference_requests_total" and sample.labels.get("model_name") == model
    )


def publish_key(server: ServerInfo, key_dir: Path) -> Path:
    """Publish ``server``'s inference key in ``key_dir`` under its gRPC address, as the
    container entry point does for a replica; the file written."""
    host, _, port = server.grpc_target.rpartition(":")
    path = key_dir / key_file_name(host, int(port))
    key_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"inference": {"key": server.key("inference")}}))
    return path


@dataclass(frozen=True)
class RunningTorchServe:
    """The session's TorchServe: its settings (ports, key file), server and archives (built
    from ``repository``); ``artifacts_dir`` holds the same weights' flat exports."""

    settings: Settings
    server: ServerInfo
    model_store: Path
    artifacts_dir: Path
    repository: Path

    def gateway_settings(self, model_repository: Path, **overrides: object) -> Settings:
        """Settings of a gateway whose batches run here: torchserve backend, ``model_repository``,
        loopback and ephemeral ports, then ``overrides``."""
        update = {
            "backend": "torchserve",
            "model_repository": model_repository,
            "host": "127.0.0.1",
            "grpc_port": 0,
            "http_port": 0,
            "metrics_port": 0,
        }
        return self.settings.model_copy(update={**update, **overrides})

    @property
    def inference_key(self) -> str:
        """The key TorchServe expects on inference calls (REST and gRPC)."""
        key = self.server.key("inference")
        assert key is not None
        return key

    @property
    def rest_url(self) -> str:
        """Base URL of the REST inference API (``{rest_url}/predictions/<model>``)."""
        return self.server.inference_url

    @property
    def grpc_target(self) -> str:
        """The gRPC inference API's address."""
        return self.server.grpc_target


@pytest.fixture(scope="session")
@starts_torchserve
def torchserve(
    artifacts_dir: Path, model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningTorchServe]:
    """A real TorchServe (JVM + one worker per model) serving the TorchScript archives of the
    default repository (convnet and fcn, version 1).

    Started once per session with ``cnnserve.torchserve_engine.process.start`` on free ports,
    token authorization on; stopped (and checked gone) at the end.
    """
    model_store = tmp_path_factory.mktemp("model_store")
    settings = torchserve_settings(model_store)
    with running_torchserve(model_repository, model_store, settings) as server:
        yield RunningTorchServe(settings, server, model_store, artifacts_dir, model_repository)
