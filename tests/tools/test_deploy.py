"""tools/deploy.py run as a user runs it: every check before a deployment fails with one
``error:`` line and exit status 2, no traceback, and nothing created on the engine; ``down``
with nothing deployed is clean. A real Docker engine, no image built.

Tests that need the daemon skip with the reason where ``docker info`` fails, except in CI,
which starts dockerd and must run them.
"""

from __future__ import annotations

import os
import runpy
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cnnserve.errors import InvalidInputError
from cnnserve.gateway.auth import read_keys_file
from cnnserve.models.repository import CONFIG_FILE, Repository, check_model_name, version_folders

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "tools" / "deploy.py"
STAGED = ROOT / "build" / "deploy" / "model_repository"
PROJECT_LABEL = "label=com.docker.compose.project=cnnserve"
#: The gateway's published host ports, in the order the tool checks them.
PUBLISHED = (8000, 8001)


def _docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=60, check=False
    )


def _engine_problem() -> str | None:
    """Why the Docker engine cannot be used here, or None."""
    if shutil.which("docker") is None:
        return "the docker CLI is not on PATH"
    if _docker("compose", "version").returncode != 0:
        return "`docker compose` (Compose v2) is not available"
    info = _docker("info", "--format", "{{.ServerVersion}}")
    if info.returncode != 0:
        return f"`docker info` fails: {(info.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


ENGINE_PROBLEM = _engine_problem()
needs_engine = pytest.mark.skipif(
    ENGINE_PROBLEM is not None and not os.environ.get("CI"),
    reason=f"needs a Docker engine: {ENGINE_PROBLEM}",
)
needs_cli = pytest.mark.skipif(
    shutil.which("docker") is None or _docker("compose", "version").returncode != 0,
    reason="needs the docker CLI with Compose v2",
)


def deploy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``tools/deploy.py ARGS`` on the bare standard library (-I -S: no site-packages), as the
    host's python3.11 runs it."""
    return subprocess.run(
        [sys.executable, "-I", "-S", str(DEPLOY), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str], status: int = 2) -> str:
    """The single ``error:`` line the run printed on stderr, checked to be all it printed."""
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert result.returncode == status, (result.returncode, lines[0])
    return lines[0]


def project_objects() -> set[str]:
    """The ids of every container and network of the cnnserve project."""
    containers = _docker("ps", "--all", "--filter", PROJECT_LABEL, "--format", "{{.ID}}")
    networks = _docker("network", "ls", "--filter", PROJECT_LABEL, "--format", "{{.ID}}")
    assert containers.returncode == 0 and networks.returncode == 0, containers.stderr
    return set(containers.stdout.split()) | set(networks.stdout.split())


def _staged_state() -> tuple[bool, int]:
    return (STAGED.exists(), STAGED.stat().st_mtime_ns if STAGED.exists() else 0)


@pytest.fixture
def nothing_created() -> Iterator[None]:
    """The test creates no container or network of the project, and stages no models."""
    before, staged = project_objects(), _staged_state()
    yield
    assert project_objects() == before
    assert _staged_state() == staged


def test_without_docker_cli_says_so(tmp_path: Path) -> None:
    """No docker on PATH: one line saying so, exit 2."""
    result = deploy("up", "--variant", "cpu", env={**os.environ, "PATH": str(tmp_path)})
    assert "docker CLI is not on PATH" in one_error_line(result)


@needs_cli
def test_unreachable_daemon_says_so() -> None:
    """DOCKER_HOST at a socket nobody serves: one line telling to start dockerd, exit 2."""
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent.sock"}
    line = one_error_line(deploy("up", "--variant", "cpu", env=env))
    assert "unix:///nonexistent.sock" in line
    assert "dockerd is not running" in line
    assert "down" in deploy("--help").stdout
    assert "dockerd is not running" in one_error_line(deploy("down", env=env))


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "no-such-repository"


def _without_models(tmp_path: Path) -> Path:
    # Folders cnnserve would not read as models: no config and no version, or an unsafe name.
    (tmp_path / "notes").mkdir()
    (tmp_path / ".hidden" / "1").mkdir(parents=True)
    return tmp_path


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "repository.tar"
    path.write_bytes(b"")
    return path


@needs_engine
@pytest.mark.usefixtures("nothing_created")
@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_missing, "does not exist"),
        (_without_models, "holds no model"),
        (_a_file, "is not a directory"),
    ],
)
def test_model_repository_without_models_is_refused(
    tmp_path: Path, make: Callable[[Path], Path], says: str
) -> None:
    """A model repository that is missing, not a folder, or holds no model: one line naming
    it, exit 2, nothing staged or started."""
    repository = make(tmp_path)
    result = deploy("up", "--variant", "cpu", "--model-repository", str(repository))
    line = one_error_line(result)
    assert str(repository) in line
    assert says in line


@pytest.fixture
def held_port() -> Iterator[int]:
    """A published port held by a listener of this test, the ports before it free."""
    for port in PUBLISHED:
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                pytest.skip(f"port {port} is in use on this host already (a deployment?)")
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", PUBLISHED[1]))
        holder.listen()
        yield PUBLISHED[1]


@needs_engine
@pytest.mark.usefixtures("nothing_created")
def test_taken_port_is_named(held_port: int) -> None:
    """A published port someone else listens on: one line naming the port (and the process,
    where ``ss`` can tell), exit 2, nothing built or started."""
    line = one_error_line(deploy("up", "--variant", "cpu"))
    assert f"port {held_port} (OIP gRPC) is already in use" in line
    if shutil.which("ss") is not None:
        assert f"pid {os.getpid()}" in line


@needs_engine
def test_down_with_nothing_deployed_is_clean() -> None:
    """``down`` with no deployment: exit 0, no error, nothing of the project left."""
    if project_objects():
        pytest.skip("a cnnserve deployment runs on this engine; down would remove it")
    result = deploy("down")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "no container or network of it is left" in result.stdout
    assert project_objects() == set()


def test_model_folders_follow_cnnserve(tmp_path: Path) -> None:
    """The tool (which runs without cnnserve installed) counts as models exactly the folders
    cnnserve's repository rules accept: a safe name holding a config or a version folder."""
    for folder in ("convnet", "fcn/1", "notes", ".hidden/1", "a..b/1", "zero/0", "lead/01"):
        (tmp_path / folder).mkdir(parents=True)
    for config in ("convnet", ".hidden", "x" * 65, "-dash"):
        (tmp_path / config).mkdir(exist_ok=True)
        (tmp_path / config / CONFIG_FILE).write_text("architecture: convnet\n")
    (tmp_path / "file.yaml").write_text("")

    def readable(name: str) -> bool:
        try:
            check_model_name(name)
        except InvalidInputError:
            return False
        folder = tmp_path / name
        return (folder / CONFIG_FILE).is_file() or any(version_folders(folder))

    expected = [name for name in Repository(tmp_path).names() if readable(name)]
    assert expected == ["convnet", "fcn"]
    assert runpy.run_path(str(DEPLOY))["repository_models"](tmp_path) == expected


def test_a_failed_start_names_the_first_service_in_trouble_in_start_order() -> None:
    """compose lists the gateway first, still starting because TorchServe never became
    healthy: the line must name TorchServe, whose log holds the cause."""
    failed_service = runpy.run_path(str(DEPLOY))["failed_service"]
    entries = [
        {"Service": "gateway", "State": "running", "Health": "starting"},
        {"Service": "torchserve", "State": "running", "Health": "starting"},
    ]
    assert failed_service(entries, 60) == ("torchserve", "did not become healthy within 60 s")
    entries.append({"Service": "gateway", "State": "exited", "ExitCode": 1})
    assert failed_service(entries, 60) == ("gateway", "exited with code 1")


def test_bind_address_must_be_an_address() -> None:
    """``--bind-address`` that is no IP address: one line, exit 2, before anything else."""
    line = one_error_line(deploy("up", "--variant", "cpu", "--bind-address", "every"))
    assert "bind address 'every' is not an IPv4 address" in line
    assert "not an IPv4 address" in one_error_line(
        deploy("up", "--variant", "cpu", "--bind-address", "::")
    )


def test_api_key_file_is_made_once_and_only_the_gateway_user_reads_past_its_folder(
    tmp_path: Path,
) -> None:
    """A missing key file is made with one random key the gateway reads (and ``$(cat)``
    gives); its folder is 0700, the file 0644 for the container's uid; a second deploy keeps
    it; another folder gets another key."""
    ensure_api_keys = runpy.run_path(str(DEPLOY))["ensure_api_keys"]
    path = tmp_path / "secrets" / "api_keys"
    assert ensure_api_keys(path) is True
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    keys = read_keys_file(path)
    assert len(keys) == 1 and len(keys[0]) >= 43  # 32 random bytes
    assert path.read_text() == f"{keys[0]}\n"
    assert ensure_api_keys(path) is False
    assert read_keys_file(path) == keys
    other = tmp_path / "other" / "api_keys"
    ensure_api_keys(other)
    assert read_keys_file(other) != keys
    assert sorted(p.name for p in path.parent.iterdir()) == ["api_keys"]


def test_an_unusable_api_key_file_is_refused(tmp_path: Path) -> None:
    """A key file without a key, or one the gateway's uid could not read: a preflight error
    (exit 2) saying what to do."""
    tool = runpy.run_path(str(DEPLOY))
    path = tmp_path / "secrets" / "api_keys"
    path.parent.mkdir()
    path.write_text("# no key yet\n\n")
    with pytest.raises(tool["DeployError"], match="holds no key") as refused:
        tool["ensure_api_keys"](path)
    assert refused.value.exit_code == 2
    path.write_text("a-key\n")
    path.chmod(0o600)
    if path.stat().st_uid != tool["IMAGE_UID"]:
        with pytest.raises(tool["DeployError"], match="not readable by the gateway"):
            tool["ensure_api_keys"](path)
    path.chmod(0o644)
    assert tool["ensure_api_keys"](path) is False


def test_the_deployment_says_where_to_call_and_with_which_key() -> None:
    """Endpoints on the bind address (localhost for every address), no metrics port, and a
    curl line that sends the key file's content."""
    tool = runpy.run_path(str(DEPLOY))
    closed = tool["Deployment"]("cpu", 1, (), 1.0, 2.0)
    assert closed.endpoints() == [
        ("OIP REST", "http://127.0.0.1:8000"),
        ("OIP gRPC", "127.0.0.1:8001"),
    ]
    (where, curl) = closed.how_to_call()
    assert str(tool["API_KEYS_FILE"]) in where
    assert f'-H "Authorization: Bearer $(cat {tool["API_KEYS_FILE"]})"' in curl
    assert "http://127.0.0.1:8000/v2/" in curl
    opened = tool["Deployment"]("cpu", 1, ("monitoring",), 1.0, 2.0, "0.0.0.0")
    assert [where for _, where in opened.endpoints()] == [
        "http://localhost:8000",
        "localhost:8001",
        "http://127.0.0.1:9090",
    ]
