"""Fixtures shared across the suite: exported artifacts and a TorchServe, once per session."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cnnserve.export.exporter import export_model
from cnnserve.models.checkpoint import load_network
from cnnserve.models.registry import MODELS
from cnnserve.settings import Settings
from cnnserve.torchserve_engine.archive import archive_models
from cnnserve.torchserve_engine.keys import key_file_name
from cnnserve.torchserve_engine.process import (
    ServerInfo,
    loopback_settings,
    start,
    stop,
)


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both models exported from the committed weights (TorchScript, ONNX, JSON)."""
    out = tmp_path_factory.mktemp("artifacts")
    for spec in MODELS.values():
        export_model(spec, load_network(spec, spec.weights_path), out, spec.weights_path)
    return out


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` right now (held together while chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def torchserve_settings(model_store: Path) -> Settings:
    """Settings for a test TorchServe on free ports, serving ``model_store`` with tokens on."""
    return loopback_settings(model_store, free_ports(6), torchserve_grpc_target=None)


#: TorchServe's count of inference requests answered, per model (its metrics API).
INFERENCE_COUNTER = (
    r'^ts_inference_requests_total\{{[^}}]*model_name="{model}"[^}}]*\}}\s+([0-9.e+]+)$'
)


def served_requests(server: ServerInfo, model: str = "convnet") -> float:
    """How many ``model`` inference requests ``server`` has answered (its metrics API)."""
    reply = httpx.get(f"{server.metrics_url}/metrics", timeout=10.0)
    reply.raise_for_status()
    counter = re.compile(INFERENCE_COUNTER.format(model=re.escape(model)), re.M)
    return sum(float(value) for value in counter.findall(reply.text))


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
    """The session's TorchServe: its settings (ports, key file), server and archives."""

    settings: Settings
    server: ServerInfo
    model_store: Path
    artifacts_dir: Path

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
def torchserve(
    artifacts_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningTorchServe]:
    """A real TorchServe (JVM + one worker per model) serving the TorchScript archives.

    Started once per session with ``cnnserve.torchserve_engine.process.start`` on free ports,
    token authorization on; stopped (and checked gone) at the end.
    """
    model_store = tmp_path_factory.mktemp("model_store")
    settings = torchserve_settings(model_store)
    archive_models(artifacts_dir, model_store, "torchscript", False, settings)
    server = start(settings, model_store)
    try:
        yield RunningTorchServe(settings, server, model_store, artifacts_dir)
    finally:
        stop(model_store)
