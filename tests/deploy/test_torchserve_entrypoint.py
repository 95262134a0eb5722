"""The TorchServe container's entry point, run for real without a container.

``deploy/torchserve_entrypoint.py`` is what the image runs as its command and HEALTHCHECK;
here it runs as a process on free ports against a real TorchServe, with the same
``CNNSERVE_*`` variables docker-compose.yml sets.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import numpy as np
import psutil
import pytest

from cnnserve.errors import UnavailableError
from cnnserve.settings import Settings
from cnnserve.torchserve_engine.archive import archive_repository
from cnnserve.torchserve_engine.client import TorchServeClient
from cnnserve.torchserve_engine.keys import KeyFile, key_expiry, key_file_name, read_inference_key
from cnnserve.torchserve_engine.process import KEY_FILE, ServerInfo, run_dir_of, status
from tests.conftest import torchserve_settings
from tests.support import starts_torchserve, stop_process, wait_until
from tests.torchserve_engine.renewal import (
    LOAD_TIMEOUT_S,
    RENEWALS,
    SHORT_EXPIRATION_MIN,
    keep_calling,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "torchserve_entrypoint.py"
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 90.0


def load_entrypoint() -> ModuleType:
    """The script as a module, for its helpers."""
    spec = importlib.util.spec_from_file_location("torchserve_entrypoint", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


entrypoint = load_entrypoint()


# --- publishing the key -----------------------------------------------------------------


def test_publish_key_writes_the_inference_key_atomically_for_the_owner_only(
    tmp_path: Path,
) -> None:
    source = tmp_path / "run" / KEY_FILE
    source.parent.mkdir()
    source.write_text('{"inference": {"key": "abc"}, "management": {"key": "secret"}}')
    target = tmp_path / "auth" / KEY_FILE
    entrypoint.publish_key(source, target)
    assert read_inference_key(target) == "abc"
    assert "secret" not in target.read_text(), "the management key left TorchServe"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == [KEY_FILE], "temporary file left"
    source.write_text('{"inference": {"key": "new"}}')
    entrypoint.publish_key(source, target)
    assert read_inference_key(target) == "new"


def test_publish_key_without_tokens_removes_a_stale_copy(tmp_path: Path) -> None:
    target = tmp_path / KEY_FILE
    target.write_text('{"inference": {"key": "old"}}')
    entrypoint.publish_key(None, target)
    assert not target.exists()
    entrypoint.publish_key(None, target)  # nothing there: still fine


def test_publish_key_to_itself_or_nowhere_changes_nothing(tmp_path: Path) -> None:
    source = tmp_path / KEY_FILE
    source.write_text('{"inference": {"key": "abc"}}')
    entrypoint.publish_key(source, source)
    entrypoint.publish_key(source, None)
    assert source.read_text() == '{"inference": {"key": "abc"}}'


def test_unknown_command_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "start"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "usage: torchserve_entrypoint.py [serve|ready]" in result.stderr


# --- logs to stdout ----------------------------------------------------------------------


def test_log_follower_copies_whole_new_lines_and_survives_a_rollover(tmp_path: Path) -> None:
    (tmp_path / "ts_log.log").write_text("from an earlier run of the container\n")
    out = io.StringIO()
    follower = entrypoint.LogFollower(tmp_path, out)
    with (tmp_path / "ts_log.log").open("a") as ts_log:
        ts_log.write("server line\nhalf a li")
    (tmp_path / "model_log.log").write_text("handler error\n")
    follower.copy_new_lines()
    assert out.getvalue() == "server line\nhandler error\n"
    with (tmp_path / "ts_log.log").open("a") as ts_log:
        ts_log.write("ne\n")
    follower.copy_new_lines()
    assert out.getvalue().endswith("handler error\nhalf a line\n")
    # log4j rolled the file over: it starts again, shorter than what was read.
    (tmp_path / "ts_log.log").write_text("after rollover\n")
    follower.copy_new_lines()
    assert out.getvalue().endswith("half a line\nafter rollover\n")


# --- the real thing ---------------------------------------------------------------------


def container_env(settings: Settings, key_dir: Path) -> dict[str, str]:
    """The environment compose gives the container, with this test's ports and paths."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNNSERVE_")}
    env.update(
        CNNSERVE_MODEL_STORE_DIR=str(settings.model_store_dir),
        CNNSERVE_TORCHSERVE_HOST=settings.torchserve_host,
        CNNSERVE_TORCHSERVE_TOKEN_AUTH="true",
        CNNSERVE_TORCHSERVE_KEY_DIR=str(key_dir),
        CNNSERVE_TORCHSERVE_INFERENCE_PORT=str(settings.torchserve_inference_port),
        CNNSERVE_TORCHSERVE_MANAGEMENT_PORT=str(settings.torchserve_management_port),
        CNNSERVE_TORCHSERVE_METRICS_PORT=str(settings.torchserve_metrics_port),
        CNNSERVE_TORCHSERVE_GRPC_INFERENCE_PORT=str(settings.torchserve_grpc_inference_port),
        CNNSERVE_TORCHSERVE_GRPC_MANAGEMENT_PORT=str(settings.torchserve_grpc_management_port),
        CNNSERVE_TORCHSERVE_INITIAL_WORKER_PORT=str(settings.torchserve_initial_worker_port),
    )
    return env


def ready(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK command, as Docker runs it."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), "ready"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def wait_ready(process: subprocess.Popen[str], env: dict[str, str]) -> None:
    """Poll the HEALTHCHECK until healthy; fail if the entry point exits first."""

    def healthy() -> bool:
        assert process.poll() is None, f"entry point exited {process.returncode} while starting"
        return ready(env).returncode == 0

    wait_until(healthy, START_TIMEOUT_S, "the entry point's HEALTHCHECK to pass", 1.0)


@pytest.fixture
@starts_torchserve
def container(
    model_repository: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[subprocess.Popen[str], dict[str, str], Path, Path]]:
    """The entry point serving a fresh model store with the repository's archives, as the
    image builds it; (process, env, published key path, its stdout and stderr as a file —
    a pipe nobody reads while TorchServe logs would fill and stall it). Parametrized
    indirectly, its parameter holds more ``CNNSERVE_*`` variables."""
    store = tmp_path / "model_store"
    store.mkdir()
    settings = torchserve_settings(store)
    archive_repository(model_repository, store, settings, "torchscript")
    key_dir = tmp_path / "auth"
    env = container_env(settings, key_dir)
    env.update(getattr(request, "param", {}))
    # Named after the address the gateway reaches this replica at, as in a container.
    name = key_file_name(entrypoint.own_address(), settings.torchserve_grpc_inference_port)
    published_key = key_dir / name
    assert ready(env).returncode == 1, "healthy before anything started"
    output = tmp_path / "entrypoint.out"
    with output.open("w") as output_file:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT)],
            env=env,
            stdout=output_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        wait_ready(process, env)
        yield process, env, published_key, output
    finally:
        stop_process(process, STOP_TIMEOUT_S)
        # Whatever the test did, no TorchServe outlives it.
        info = ServerInfo.load(run_dir_of(store))
        if info is not None and psutil.pid_exists(info.pid):
            psutil.Process(info.pid).kill()


@pytest.mark.torchserve
async def test_serves_publishes_the_key_and_stops_on_sigterm(
    container: tuple[subprocess.Popen[str], dict[str, str], Path, Path],
) -> None:
    process, env, published_key, output_path = container
    store = Path(env["CNNSERVE_MODEL_STORE_DIR"])
    # The published key is TorchServe's own inference key, and it works for inference.
    assert read_inference_key(published_key) == read_inference_key(run_dir_of(store) / KEY_FILE)
    assert [p.name for p in published_key.parent.iterdir()] == [published_key.name]
    target = f"127.0.0.1:{env['CNNSERVE_TORCHSERVE_GRPC_INFERENCE_PORT']}"
    client = TorchServeClient(target, read_inference_key(published_key))
    try:
        items = np.zeros((2, 3, 28, 28), np.float32)
        outputs = await client.predict_batch("convnet", items, version="1")
    finally:
        await client.close()
    assert outputs.shape == (2, 10)

    process.send_signal(signal.SIGTERM)
    process.wait(timeout=STOP_TIMEOUT_S)
    output = output_path.read_text()
    assert process.returncode == 0, output
    assert "SIGTERM: stopping TorchServe" in output
    # TorchServe's own log lines reach the container's stdout: the server's, a worker's
    # (where handler errors go), and the access log's line for the call above.
    assert "Torchserve version" in output
    assert "MODEL_LOG" in output
    assert "ACCESS_LOG" in output
    assert not status(store).running
    assert ready(env).returncode == 1
    assert not published_key.exists(), "a stopped replica's key stayed published"


@pytest.mark.torchserve
def test_exits_with_failure_when_torchserve_dies(
    container: tuple[subprocess.Popen[str], dict[str, str], Path, Path],
) -> None:
    """A dead JVM ends the container (exit 1), so the orchestrator restarts it."""
    process, env, _, output_path = container
    info = ServerInfo.load(run_dir_of(Path(env["CNNSERVE_MODEL_STORE_DIR"])))
    assert info is not None
    psutil.Process(info.pid).kill()
    process.wait(timeout=STOP_TIMEOUT_S)
    output = output_path.read_text()
    assert process.returncode == 1, output
    assert f"TorchServe (pid {info.pid}) exited" in output
    assert ready(env).returncode == 1


# --- keys that renew themselves -------------------------------------------------------------

#: Keys valid for seconds (tests/torchserve_engine/renewal.py).
SHORT_KEYS = {"CNNSERVE_TORCHSERVE_TOKEN_EXPIRATION_MIN": str(SHORT_EXPIRATION_MIN)}
#: Keys nobody renews, valid long enough for the start and its HEALTHCHECK to pass first.
UNRENEWED_KEYS = {
    "CNNSERVE_TORCHSERVE_TOKEN_EXPIRATION_MIN": "0.5",
    "CNNSERVE_TORCHSERVE_TOKEN_RENEW_FRACTION": "0",
    # Refused for 5 s (seen at two checks 10 s apart): the entry point exits to be restarted.
    "CNNSERVE_TORCHSERVE_KEY_REFUSED_EXIT_S": "5",
}


def replica_client(env: dict[str, str], published_key: Path) -> TorchServeClient:
    """A client of this replica's gRPC API sending the key it published, read as the gateway
    reads it (again whenever the file changes or a call is refused)."""
    target = f"127.0.0.1:{env['CNNSERVE_TORCHSERVE_GRPC_INFERENCE_PORT']}"
    return TorchServeClient(target, KeyFile(published_key))


@pytest.mark.torchserve
@pytest.mark.parametrize("container", [SHORT_KEYS], indirect=True)
async def test_keys_renew_and_each_new_key_is_published_while_serving(
    container: tuple[subprocess.Popen[str], dict[str, str], Path, Path],
) -> None:
    """Keys of 9 s: the entry point renews them and publishes each new inference key; a
    client reading the published file, under load from concurrent callers, has no call fail
    through several renewals, and the HEALTHCHECK passes throughout."""
    process, env, published_key, output_path = container
    client = replica_client(env, published_key)
    seen: list[str] = []
    items = np.zeros((2, 3, 28, 28), np.float32)

    async def watch() -> None:
        while True:
            key = read_inference_key(published_key)  # replaced atomically: always whole
            if not seen or seen[-1] != key:
                seen.append(key)
            await asyncio.sleep(0.1)

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        load = await keep_calling(
            lambda: client.predict_batch("convnet", items, timeout_s=60, version="1"),
            lambda: len(seen) > RENEWALS,
            LOAD_TIMEOUT_S,
        )
        healthy = ready(env)
    finally:
        watcher.cancel()
        await client.close()
    output = output_path.read_text()
    assert len(seen) > RENEWALS, f"{len(seen) - 1} renewals in {LOAD_TIMEOUT_S} s:\n{output}"
    assert load.failures == [], f"{len(load.failures)} of {load.answered} calls failed"
    assert load.answered > 0
    assert healthy.returncode == 0, healthy.stdout
    assert output.count("renewed TorchServe's inference") >= RENEWALS
    assert process.poll() is None


@pytest.mark.torchserve
@pytest.mark.parametrize("container", [UNRENEWED_KEYS], indirect=True)
async def test_an_expired_key_fails_the_healthcheck(
    container: tuple[subprocess.Popen[str], dict[str, str], Path, Path],
) -> None:
    """Renewal off: once the key expires, TorchServe still runs but refuses every call, and
    the HEALTHCHECK says so (exit 1), naming the key; once refused for
    ``torchserve_key_refused_exit_s`` the entry point stops TorchServe and exits 1, so the
    orchestrator restarts the container with fresh keys."""
    process, env, published_key, output_path = container
    info = ServerInfo.load(run_dir_of(Path(env["CNNSERVE_MODEL_STORE_DIR"])))
    assert info is not None and info.key_file is not None
    expiry = key_expiry(info.key_file, "inference")
    await asyncio.sleep((expiry - datetime.now(UTC)).total_seconds() + 0.5)
    client = replica_client(env, published_key)
    try:
        with pytest.raises(UnavailableError, match="refused the inference key"):
            await client.predict_batch("convnet", np.zeros((1, 3, 28, 28), np.float32))
    finally:
        await client.close()
    unhealthy = ready(env)
    assert unhealthy.returncode == 1
    assert "TorchServe refuses the inference key published in" in unhealthy.stdout
    assert status(info.model_store).running
    # Refusals are seen at checks 10 s apart: the second one, at most ~20 s after expiry.
    process.wait(timeout=60)
    output = output_path.read_text()
    assert process.returncode == 1, output
    assert "stopping TorchServe so that the container restarts with fresh keys" in output
    assert not status(info.model_store).running
    assert not published_key.exists()
