"""``cnnserve archive`` and ``cnnserve torchserve start|status|stop``, run as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from cnnserve.torchserve_engine.process import ServerInfo, run_dir_of, status

from ..conftest import torchserve_settings
from ..images import digit_png

CNNSERVE = str(Path(sys.executable).parent / "cnnserve")


def cnnserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CNNSERVE, *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_archive_errors_are_one_line(model_repository: Path, tmp_path: Path) -> None:
    result = cnnserve(
        "archive", "--repository", str(model_repository), "--model-store", str(tmp_path),
        "--format", "onnx", "--half",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: convnet version 1: half precision is offered for TorchScript artifacts only "
        "and this model is served from onnx; drop --half or serve it as torchscript"
    ]
    empty = cnnserve("archive", "--repository", str(tmp_path), "--model-store", str(tmp_path))
    assert empty.returncode == 2
    assert len(empty.stderr.strip().splitlines()) == 1
    assert "holds no model version to serve" in empty.stderr


def test_start_with_a_broken_archive_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "convnet.1.mar").write_text("not an archive")
    result = cnnserve("torchserve", "start", "--model-store", str(tmp_path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "convnet.1.mar is not a TorchServe archive" in result.stderr


@pytest.mark.torchserve
def test_archive_start_status_stop_leaves_nothing_running(
    model_repository: Path, tmp_path: Path
) -> None:
    """The README's path, with token authorization switched off for development."""
    store = tmp_path / "store"
    settings = torchserve_settings(store)
    env = dict(os.environ)
    for field in (
        "inference_port",
        "management_port",
        "metrics_port",
        "grpc_inference_port",
        "grpc_management_port",
        "initial_worker_port",
    ):
        env[f"CNNSERVE_TORCHSERVE_{field.upper()}"] = str(getattr(settings, f"torchserve_{field}"))
    env["CNNSERVE_MODEL_STORE_DIR"] = str(store)

    built = cnnserve("archive", "--repository", str(model_repository), env=env)
    assert built.returncode == 0, built.stderr
    assert sorted(p.name for p in store.glob("*.mar")) == ["convnet.1.mar", "fcn.1.mar"]
    assert cnnserve("torchserve", "status", env=env).returncode == 1

    started = cnnserve("torchserve", "start", "--no-token-auth", env=env)
    assert started.returncode == 0, started.stderr
    assert "TorchServe ready" in started.stdout
    info = ServerInfo.load(run_dir_of(store))
    assert info is not None and info.key_file is None
    try:
        assert cnnserve("torchserve", "status", env=env).returncode == 0  # every model READY
        assert status(store).workers == {"convnet/1": ["READY"], "fcn/1": ["READY"]}
        png, _ = digit_png(0)
        response = httpx.post(f"{info.inference_url}/predictions/convnet", content=png)
        assert response.status_code == 200  # no key needed with --no-token-auth
        jvm = psutil.Process(info.pid)
        processes = [jvm, *jvm.children(recursive=True)]
        assert len(processes) == 3  # the JVM and one worker per model
    finally:
        stopped = cnnserve("torchserve", "stop", env=env)
    assert stopped.returncode == 0
    assert "TorchServe stopped" in stopped.stdout
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)
    assert not info.tmp_dir.exists()
    assert cnnserve("torchserve", "status", env=env).returncode == 1
    assert "was not running" in cnnserve("torchserve", "stop", env=env).stdout
