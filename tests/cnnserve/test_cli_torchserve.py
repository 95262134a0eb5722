"""``cnnserve archive`` and ``cnnserve torchserve start|status|stop``, run as a user would."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from cnnserve.errors import UnavailableError
from cnnserve.torchserve_engine.keys import read_key
from cnnserve.torchserve_engine.process import (
    RENEWER_MODULE,
    RENEWER_PID_FILE,
    ServerInfo,
    run_dir_of,
    status,
)

from ..conftest import torchserve_settings
from ..images import digit_png
from ..support import wait_until

CNNSERVE = str(Path(sys.executable).parent / "cnnserve")


def cnnserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CNNSERVE, *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def torchserve_env(store: Path, **settings: str) -> dict[str, str]:
    """This environment with a TorchServe serving ``store`` on free ports, as a user sets
    ``CNNSERVE_*`` variables; ``settings`` adds others (``token_renew_fraction="0"``)."""
    chosen = torchserve_settings(store)
    env = dict(os.environ)
    for field in (
        "inference_port",
        "management_port",
        "metrics_port",
        "grpc_inference_port",
        "grpc_management_port",
        "initial_worker_port",
    ):
        env[f"CNNSERVE_TORCHSERVE_{field.upper()}"] = str(getattr(chosen, f"torchserve_{field}"))
    env["CNNSERVE_MODEL_STORE_DIR"] = str(store)
    env.update({f"CNNSERVE_TORCHSERVE_{name.upper()}": value for name, value in settings.items()})
    return env


def renewers_of(store: Path) -> list[psutil.Process]:
    """The key renewer processes running for ``store`` (whoever started them)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        command = process.info["cmdline"] or []
        if process.info["status"] == psutil.STATUS_ZOMBIE or RENEWER_MODULE not in command:
            continue
        if str(store.resolve()) in command:
            found.append(process)
    return found


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
    env = torchserve_env(store)

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


#: Keys of 12 s (``torchserve_token_expiration_min``), renewed with 3 s left at the default
#: fraction: a renewal every ~9 s.
SHORT_EXPIRATION_MIN = 0.2
#: A model no archive has: TorchServe checks the key first (400 ``InvalidKeyException`` when
#: refused), then answers 404 for the unknown model without running anything.
UNKNOWN_MODEL = ".cnnserve-key-check"


def _check_key(info: ServerInfo) -> httpx.Response:
    """A REST inference call authorized with the key ``key_file.json`` holds now."""
    key = read_key(info.key_file, "inference") if info.key_file is not None else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{info.inference_url}/predictions/{UNKNOWN_MODEL}", headers=headers)


@pytest.mark.torchserve
def test_start_leaves_a_renewer_that_keeps_the_keys_valid_until_stop(tmp_path: Path) -> None:
    """Without a gateway (curl with the key file) the keys still outlive their lifetime."""
    store = tmp_path / "store"
    store.mkdir()
    env = torchserve_env(store, token_expiration_min=str(SHORT_EXPIRATION_MIN))
    started = cnnserve("torchserve", "start", env=env)
    assert started.returncode == 0, started.stderr
    began = time.monotonic()
    info = ServerInfo.load(run_dir_of(store))
    assert info is not None and info.key_file is not None
    renewers = renewers_of(store)
    try:
        assert len(renewers) == 1
        pid = renewers[0].pid
        assert f"key renewal     by pid {pid}" in started.stdout
        assert f"key renewal     by pid {pid}" in cnnserve("torchserve", "status", env=env).stdout
        assert (info.run_dir / RENEWER_PID_FILE).read_text().strip() == str(pid)
        assert renewers[0].ppid() != os.getpid()  # detached: the command that started it is gone

        keys: set[str] = set()
        lifetime_s = SHORT_EXPIRATION_MIN * 60
        key_file = info.key_file

        def past_two_lifetimes() -> bool:
            with contextlib.suppress(UnavailableError):  # the file is being rewritten
                keys.add(read_key(key_file, "inference"))
            return time.monotonic() - began > 2 * lifetime_s + 2

        wait_until(past_two_lifetimes, 3 * lifetime_s, "two key lifetimes to pass", 0.2)
        assert len(keys) >= 3, f"the key changed {len(keys) - 1} time(s) in two lifetimes"
        answer = _check_key(info)
        if answer.status_code == 400:  # renewed between the read and the call: read it again
            answer = _check_key(info)
        assert answer.status_code == 404, answer.text  # accepted; 400 is a refused key
    finally:
        stopped = cnnserve("torchserve", "stop", env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert renewers_of(store) == []  # stop ended it (and waited for it)
    log = (info.run_dir / "logs" / "renewer.log").read_text()
    assert "renewed TorchServe's inference and management key" in log


@pytest.mark.torchserve
def test_with_renewal_off_start_leaves_no_renewer(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    env = torchserve_env(store, token_renew_fraction="0")
    started = cnnserve("torchserve", "start", env=env)
    assert started.returncode == 0, started.stderr
    try:
        assert "key renewal     off" in started.stdout
        assert renewers_of(store) == []
        assert not (run_dir_of(store) / RENEWER_PID_FILE).exists()
    finally:
        assert cnnserve("torchserve", "stop", env=env).returncode == 0


@pytest.mark.torchserve
def test_the_renewer_exits_when_its_torchserve_dies(tmp_path: Path) -> None:
    """A JVM killed (not stopped) leaves no renewer behind either."""
    store = tmp_path / "store"
    store.mkdir()
    env = torchserve_env(store)
    started = cnnserve("torchserve", "start", env=env)
    assert started.returncode == 0, started.stderr
    info = ServerInfo.load(run_dir_of(store))
    assert info is not None
    try:
        assert len(renewers_of(store)) == 1
        psutil.Process(info.pid).kill()
        wait_until(lambda: not renewers_of(store), 10, "the renewer to exit")
    finally:
        cnnserve("torchserve", "stop", env=env)
    log = (info.run_dir / "logs" / "renewer.log").read_text()
    assert f"TorchServe pid {info.pid} is gone; the renewer exits" in log
