"""The command line: export works from any checkpoint form; serve makes and serves the default
repository and takes the repository flags; user errors are one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch
from typer.testing import CliRunner

from cnnserve.cli import app
from cnnserve.models.networks import ConvNet
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from tests.support import free_ports, stop_process, wait_until

from ..models import tutorial_classes

runner = CliRunner()


def test_export_accepts_a_tutorial_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    checkpoint = tmp_path / "tutorial_convnet.pt"
    torch.save(tutorial_classes.ConvNet(10).state_dict(), checkpoint)
    result = runner.invoke(
        app, ["export", "convnet", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "convnet.json").read_text())
    assert meta["files"]["checkpoint"]["file"] == str(checkpoint)
    assert (tmp_path / "out" / "convnet.onnx").stat().st_size > 1_000_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "resnet"], "error: unknown model 'resnet'; served models are: convnet, fcn"),
        (
            ["export", "convnet", "--checkpoint", "/nonexistent/c.pt"],
            "error: checkpoint not found: /nonexistent/c.pt",
        ),
        (["train", "vgg"], "error: unknown model 'vgg'"),
        (
            ["soak", "--artifacts", "/nonexistent"],
            "error: convnet.onnx not in /nonexistent: export the models first (make export) "
            "or give --artifacts",
        ),
        (["overload", "--artifacts", "/nonexistent"], "error: fcn.onnx not in /nonexistent"),
        (["hotpath", "nope"], "error: unknown profile nope; choose from ort-c1-tensor,"),
    ],
)
def test_user_errors_are_one_line(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_wrong_shapes_name_the_mismatch_without_a_traceback(tmp_path: Path) -> None:
    checkpoint = tmp_path / "seven_classes.pt"
    torch.save(ConvNet(7).state_dict(), checkpoint)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cnnserve",
            "export",
            "convnet",
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"error: {checkpoint} has wrong parameter shapes: "
        "fc2.weight: checkpoint [7, 512] vs model [10, 512]; "
        "fc2.bias: checkpoint [7] vs model [10]"
    ]


@contextmanager
def serving(cwd: Path, *flags: str) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    """``cnnserve serve`` (onnxruntime) run from ``cwd`` with ``flags`` and no ``CNNSERVE_*``
    variable, until gRPC ServerReady says true; stopped (and checked to exit 0) after."""
    grpc_port, http_port, metrics_port = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNNSERVE_")}
    command = [
        sys.executable, "-m", "cnnserve", "serve", "--backend", "onnxruntime",
        "--grpc-port", str(grpc_port), "--http-port", str(http_port),
        "--metrics-port", str(metrics_port), *flags,
    ]  # fmt: skip
    log = (cwd / "serve.log").open("wb")
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]

            def ready() -> bool:
                assert process.poll() is None, (cwd / "serve.log").read_text()[-3000:]
                try:
                    return bool(stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready)
                except grpc.RpcError:
                    return False

            wait_until(ready, 180, "cnnserve serve to be ready")
            yield stub
    finally:
        assert stop_process(process, 60) == 0
        log.close()


def test_serve_at_the_default_settings_makes_the_demo_repository(tmp_path: Path) -> None:
    """A fresh working directory: `cnnserve serve` exports the two demo models into
    ./model_repository and serves them, no export step first."""
    with serving(tmp_path) as stub:
        for model in ("convnet", "fcn"):
            metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=model))
            assert list(metadata.versions) == ["1"]
    for model in ("convnet", "fcn"):
        assert (tmp_path / "model_repository" / model / "1" / "model.onnx").is_file()


def test_serve_loads_what_load_model_names_in_explicit_mode(
    model_repository: Path, tmp_path: Path
) -> None:
    flags = ["--model-repository", str(model_repository), "--model-control-mode", "explicit"]
    with serving(tmp_path, *flags, "--load-model", "fcn") as stub:
        assert stub.ModelReady(pb.ModelReadyRequest(name="fcn")).ready
        assert not stub.ModelReady(pb.ModelReadyRequest(name="convnet")).ready
    assert not (tmp_path / "model_repository").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model-repository", "missing"], "missing: the model repository is not a folder"),
        (["--load-model", "convnet"], "load_models applies to model_control_mode explicit only"),
        (["--model-control-mode", "sometimes"], "Invalid value for '--model-control-mode'"),
    ],
)
def test_serve_refuses_repository_settings_that_cannot_work(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNNSERVE_")}
    command = [sys.executable, "-m", "cnnserve", "serve", "--grpc-port", "0", *flags]
    proc = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "model_repository").exists()


def _serve(
    model_repository: Path, cwd: Path, *flags: str, ports: list[int] | None = None
) -> subprocess.CompletedProcess[str]:
    """``cnnserve serve`` of ``model_repository`` with ``flags`` and no ``CNNSERVE_*``
    variable, on ``ports`` (gRPC, HTTP, metrics; default: free ones), expected to fail: its
    exit status and output."""
    grpc_port, http_port, metrics_port = ports or free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNNSERVE_")}
    command = [
        sys.executable, "-m", "cnnserve", "serve", "--model-repository", str(model_repository),
        "--grpc-port", str(grpc_port), "--http-port", str(http_port),
        "--metrics-port", str(metrics_port), *flags,
    ]  # fmt: skip
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False
    )


def test_serve_with_a_missing_tls_file_is_one_line(model_repository: Path, tmp_path: Path) -> None:
    proc = _serve(model_repository, tmp_path, "--tls-cert", "none.crt", "--tls-key", "none.key")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] in (
        "error: none.crt: No such file or directory",
        "error: none.key: No such file or directory",
    )


@pytest.mark.parametrize(
    ("taken", "message"),
    [
        ("--grpc-port", "error: Failed to bind to address 127.0.0.1:{port}: give another"),
        ("--http-port", "error: Address already in use (while attempting to bind on address"),
    ],
)
def test_serve_on_a_taken_port_is_one_line(
    model_repository: Path, tmp_path: Path, taken: str, message: str
) -> None:
    ports = free_ports(3)
    port = ports[0] if taken == "--grpc-port" else ports[1]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        proc = _serve(model_repository, tmp_path, ports=ports)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(message.format(port=port))
