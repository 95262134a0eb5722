"""Deploy cnnserve with Docker Compose, or take the deployment down again.

    python3 tools/deploy.py up --variant cpu|gpu [--model-repository DIR] [--timeout S]
                               [--scale N] [--profile monitoring] [--bind-address ADDR]
    python3 tools/deploy.py down

``up`` checks the host first (Docker CLI, Compose v2, a reachable daemon, the NVIDIA toolkit for
the gpu variant, the model repository, the host ports the stack publishes, the base image) and
stops at the first problem with one ``error:`` line and exit status 2, having started and built
nothing. Then it fills the wheelhouse (tools/wheelhouse.py), stages the model repository into
the build context (build/deploy/model_repository/; empty: the image build exports the demo
models), makes sure the gateway's API-key file exists (secrets/api_keys: one random key when
it is missing), builds the images and starts the stack, returning once every service is
healthy; the ports bind 127.0.0.1 unless ``--bind-address`` says otherwise. A
failure from there on is one ``error:`` line too, exit status 1: the failed service's logs are
saved under build/deploy/ and the stack is taken down, so nothing is left half-started.

``down`` removes the stack's containers and networks (every profile, both compose files) and
checks that none is left; named volumes are kept and listed.

Only the standard library: it runs with the host's python3.11, before any environment exists.
Importable as well: :func:`up`, :func:`down`, :class:`DeployError`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "cnnserve"
PROJECT_LABEL = f"com.docker.compose.project={PROJECT}"
BASE_IMAGE = "debian:bookworm-slim"
BASE_IMAGE_SCRIPT = ROOT / "deploy" / "base_image.sh"
WHEELHOUSE_SCRIPT = ROOT / "tools" / "wheelhouse.py"
#: Logs of every step, and the model repository the image build bakes in.
DEPLOY_DIR = ROOT / "build" / "deploy"
STAGED_REPOSITORY = DEPLOY_DIR / "model_repository"
#: The compose files of each variant: the cpu file only drops the GPU from the gpu stack.
COMPOSE_FILES = {
    "gpu": ("docker-compose.yml",),
    "cpu": ("docker-compose.yml", "docker-compose.cpu.yml"),
}
PROFILES = ("monitoring",)
#: docker-compose.cpu.yml drops the GPU reservation with `!reset`, new in Compose 2.24.
MIN_COMPOSE = (2, 24)
#: The gateway's host ports: (port, what it is). They bind --bind-address; the metrics port
#: (8002) is not published at all (Prometheus scrapes it over the compose network).
GATEWAY_PORTS = ((8000, "OIP REST"), (8001, "OIP gRPC"))
#: Prometheus (no authentication of its own) binds loopback whatever --bind-address says.
MONITORING_PORTS = (("127.0.0.1", 9090, "Prometheus"),)
#: Where the gateway's ports bind unless the user opens them up (closed by default).
DEFAULT_BIND_ADDRESS = "127.0.0.1"
#: The compose files read the bind address from this variable.
BIND_ADDRESS_ENV = "CNNSERVE_BIND_ADDRESS"
#: The gateway's accepted API keys, one per line: the compose secret ``api_keys``. Outside
#: git (.gitignore) and outside the build context (.dockerignore lets in named folders only).
API_KEYS_FILE = ROOT / "secrets" / "api_keys"
#: The uid the images run as: the gateway reads the key file through a bind mount as this user.
IMAGE_UID = 10001
DEFAULT_TIMEOUT_S = 900
#: Quick questions to the engine; a daemon that does not answer them in time is not usable.
QUERY_TIMEOUT_S = 30
PULL_TIMEOUT_S = 120
BASE_IMAGE_TIMEOUT_S = 900
#: How long compose may take beyond its own --wait-timeout before it is given up on.
COMPOSE_MARGIN_S = 120
DOWN_TIMEOUT_S = 300
# The model folder rules of cnnserve.models.repository (check_model_name, version_folders),
# restated because this runs without the package installed.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VERSION = re.compile(r"[1-9][0-9]*")
# A listener's process in `ss -ltnp` output: users:(("name",pid=123,fd=4)).
_SS_USER = re.compile(r'users:\(\("([^"]+)",pid=(\d+)')

#: Exit status of a failed check before anything was built or started.
PREFLIGHT_FAILED = 2
#: Exit status of a deployment that failed after the checks.
DEPLOY_FAILED = 1


class DeployError(Exception):
    """Why the deployment could not go on, as one line; ``exit_code`` is the CLI's status."""

    def __init__(self, message: str, exit_code: int = DEPLOY_FAILED) -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = exit_code


def _preflight(message: str) -> DeployError:
    return DeployError(message, PREFLIGHT_FAILED)


@dataclass(frozen=True)
class Deployment:
    """A stack that came up: its endpoints and how long it took."""

    variant: str
    scale: int
    profiles: tuple[str, ...]
    build_s: float
    healthy_s: float
    bind_address: str = DEFAULT_BIND_ADDRESS
    api_keys_file: Path = API_KEYS_FILE

    def endpoints(self) -> list[tuple[str, str]]:
        """(what, where) for each endpoint the host reaches."""
        # Every address (0.0.0.0) is reached at localhost from this host.
        host = "localhost" if self.bind_address == "0.0.0.0" else self.bind_address
        found = [("OIP REST", f"http://{host}:8000"), ("OIP gRPC", f"{host}:8001")]
        if "monitoring" in self.profiles:
            found.append(("Prometheus", "http://127.0.0.1:9090"))
        return found

    def how_to_call(self) -> list[str]:
        """Where the API key is and a call that sends it, as lines to print."""
        rest = self.endpoints()[0][1]
        return [
            f"API key: {self.api_keys_file} (every call but health needs it; one key a line)",
            f'  curl -H "Authorization: Bearer $(cat {self.api_keys_file})" '
            f"{rest}/v2/models/convnet",
        ]


def _relative(path: Path) -> str:
    """``path`` as the user finds it from the repository root."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def _last_line(text: str) -> str:
    """The last non-empty line of a tool's output, without an ``error:`` prefix of its own."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1]
    return line[len("error:") :].strip() if line.lower().startswith("error:") else line


#: The environment of every command: the bind address the compose files publish on, the
#: default unless up() set another.
_ENV = {**os.environ, BIND_ADDRESS_ENV: DEFAULT_BIND_ADDRESS}


def _run(
    command: Sequence[str], timeout: float | None, log: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` from the repository root; its output captured, or written to ``log``
    (then ``stdout`` of the result is the log's text). Raises :class:`subprocess.TimeoutExpired`
    after ``timeout`` seconds (None: no limit), the command killed."""
    if log is None:
        return subprocess.run(
            command,
            cwd=ROOT,
            env=_ENV,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as out:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=_ENV,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
    return subprocess.CompletedProcess(
        done.args, done.returncode, log.read_text(encoding="utf-8", errors="replace"), ""
    )


def _query(command: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """A quick question to the engine, answered within QUERY_TIMEOUT_S or a DeployError."""
    try:
        return _run(command, QUERY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise _preflight(
            f"`{' '.join(command)}` got no answer within {QUERY_TIMEOUT_S} s: "
            "check that dockerd is running and responsive"
        ) from None


def compose_command(
    files: Sequence[str], profiles: Sequence[str] = (), progress: bool = False
) -> list[str]:
    """``docker compose`` for this project, its files and profiles."""
    command = ["docker", "compose", "-p", PROJECT]
    for name in files:
        command += ["-f", name]
    for profile in profiles:
        command += ["--profile", profile]
    if progress:
        # Logs read line by line instead of the terminal's redrawn progress display.
        command += ["--progress", "plain"]
    return command


# --- preflight -------------------------------------------------------------------------


def check_docker() -> None:
    """The docker CLI, Compose v2 and a daemon that answers; else a preflight DeployError."""
    if shutil.which("docker") is None:
        raise _preflight(
            "the docker CLI is not on PATH: install Docker Engine and its Compose v2 plugin "
            "(https://docs.docker.com/engine/install/)"
        )
    version = _query(["docker", "compose", "version", "--short"])
    if version.returncode != 0:
        raise _preflight(
            "`docker compose` (Compose v2) is not available: install the Compose v2 plugin "
            "(https://docs.docker.com/compose/install/linux/); the old docker-compose 1.x will "
            "not do"
        )
    found = re.match(r"v?(\d+)\.(\d+)", version.stdout.strip())
    if found and (int(found[1]), int(found[2])) < MIN_COMPOSE:
        raise _preflight(
            f"Docker Compose {version.stdout.strip()} is too old: the compose files need "
            f"{'.'.join(map(str, MIN_COMPOSE))} or newer "
            "(https://docs.docker.com/compose/install/linux/)"
        )
    info = _query(["docker", "info", "--format", "{{.ServerVersion}}"])
    if info.returncode != 0 or not info.stdout.strip():
        if "permission denied" in info.stderr.lower():
            raise _preflight(
                "permission denied on the Docker daemon's socket: run as root or as a member "
                "of the docker group"
            )
        where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        raise _preflight(
            f"cannot reach the Docker daemon at {where}: dockerd is not running (or "
            "DOCKER_HOST is wrong): start it, e.g. `dockerd &`"
        )


def check_gpu_support() -> None:
    """The NVIDIA Container Toolkit, which the gpu variant's device reservation needs."""
    info = _query(["docker", "info", "--format", "{{json .Runtimes}}"])
    registered = info.returncode == 0 and "nvidia" in info.stdout
    if not registered and shutil.which("nvidia-container-runtime-hook") is None:
        raise _preflight(
            "the gpu variant needs the NVIDIA Container Toolkit, and Docker lists no nvidia "
            "runtime: set it up (docs/deployment.md), or deploy without a GPU: --variant cpu "
            "(make deploy DEPLOY=cpu)"
        )


def repository_models(root: Path) -> list[str]:
    """The folders of ``root`` that cnnserve reads as models: a safe name holding a
    ``config.yaml`` or a version folder (a positive integer)."""
    found = []
    for child in sorted(root.iterdir()):
        if not child.is_dir() or not _MODEL_NAME.fullmatch(child.name) or ".." in child.name:
            continue
        versions = (p for p in child.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name))
        if (child / "config.yaml").is_file() or any(versions):
            found.append(child.name)
    return found


def check_model_repository(repository: Path) -> list[str]:
    """The models of ``repository``; a preflight DeployError when it holds none."""
    hint = "export one with `cnnserve export --repository DIR`, or leave it out for the demo models"
    if not repository.exists():
        raise _preflight(f"model repository {repository} does not exist: {hint}")
    if not repository.is_dir():
        raise _preflight(f"model repository {repository} is not a directory: {hint}")
    if STAGED_REPOSITORY.resolve().is_relative_to(repository.resolve()):
        # It would be copied into itself.
        raise _preflight(
            f"model repository {repository} holds the build folder {_relative(DEPLOY_DIR)}: "
            "give the folder of the models themselves"
        )
    try:
        models = repository_models(repository)
    except OSError as exc:
        raise _preflight(f"model repository {repository} cannot be read: {exc.strerror}") from None
    if not models:
        raise _preflight(
            f"model repository {repository} holds no model (a model is a folder with a "
            f"config.yaml or numbered version folders): {hint}"
        )
    return models


def _port_free(address: str, port: int) -> bool:
    """Whether a listener could bind ``address:port`` now (as docker-proxy would)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # Like any server (docker-proxy too): connections in TIME_WAIT do not hold the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            # Any other error: no IPv6 on this host (or no such address), nothing to collide with.
            return exc.errno != errno.EADDRINUSE
    return True


def _publishing_containers(port: int) -> list[tuple[str, str]]:
    """(container, its compose project) for each container publishing host ``port``."""
    listed = _query(
        [
            "docker",
            "ps",
            "--filter",
            f"publish={port}",
            "--format",
            '{{.Names}}\t{{.Label "com.docker.compose.project"}}',
        ]
    )
    return [
        (name, project)
        for name, _, project in (line.partition("\t") for line in listed.stdout.splitlines())
        if name
    ]


def _listener(port: int) -> str | None:
    """Who listens on TCP ``port`` as ``ss -ltnp`` tells it (a process needs privileges to be
    named), or None."""
    if shutil.which("ss") is None:
        return None
    try:
        listed = _run(["ss", "-Hltnp", f"sport = :{port}"], QUERY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None
    holders = {f"{name}, pid {pid}" for name, pid in _SS_USER.findall(listed.stdout)}
    return "; ".join(sorted(holders)) or None


def check_ports(profiles: Sequence[str], bind_address: str = DEFAULT_BIND_ADDRESS) -> None:
    """Every host port the stack publishes is free, or held by this project's own containers
    (a running deployment being updated); else a preflight DeployError naming port and holder."""
    wanted = [(bind_address, port, what) for port, what in GATEWAY_PORTS]
    if "monitoring" in profiles:
        wanted += MONITORING_PORTS
    for address, port, what in wanted:
        addresses = [address, "::"] if address == "0.0.0.0" else [address]
        if all(_port_free(a, port) for a in addresses):
            continue
        containers = _publishing_containers(port)
        if containers and all(project == PROJECT for _, project in containers):
            continue
        if containers:
            holder = "container " + ", ".join(name for name, _ in containers)
            fix = "stop that container"
        else:
            holder = _listener(port) or "another process (`ss -ltnp` names it when run as root)"
            fix = "stop that process"
        raise _preflight(
            f"port {port} ({what}) is already in use on this host, by {holder}: the stack "
            f"publishes it; {fix} and deploy again"
        )


def ensure_base_image() -> None:
    """``debian:bookworm-slim`` present, pulled, or made by deploy/base_image.sh (a host that
    cannot reach a registry); else a preflight DeployError."""
    if _query(["docker", "image", "inspect", BASE_IMAGE]).returncode == 0:
        return
    print(f"base image {BASE_IMAGE} is missing: pulling it", flush=True)
    try:
        pulled = _run(["docker", "pull", BASE_IMAGE], PULL_TIMEOUT_S)
        pull_error = _last_line(pulled.stderr)
    except subprocess.TimeoutExpired:
        pulled, pull_error = None, f"no answer within {PULL_TIMEOUT_S} s"
    if pulled is not None and pulled.returncode == 0:
        return
    log = DEPLOY_DIR / "base_image.log"
    print(
        f"cannot pull it ({pull_error}): creating it with {_relative(BASE_IMAGE_SCRIPT)} "
        f"(log: {_relative(log)})",
        flush=True,
    )
    try:
        made = _run(["bash", str(BASE_IMAGE_SCRIPT), BASE_IMAGE], BASE_IMAGE_TIMEOUT_S, log)
    except subprocess.TimeoutExpired:
        raise _preflight(
            f"base image {BASE_IMAGE} cannot be pulled, and {_relative(BASE_IMAGE_SCRIPT)} did "
            f"not finish within {BASE_IMAGE_TIMEOUT_S} s (log: {_relative(log)})"
        ) from None
    if made.returncode != 0:
        raise _preflight(
            f"base image {BASE_IMAGE} cannot be pulled ({pull_error}) and "
            f"{_relative(BASE_IMAGE_SCRIPT)} failed: {_last_line(made.stdout)} "
            f"(log: {_relative(log)})"
        )


def check_bind_address(address: str) -> None:
    """``address`` is an IPv4 address (compose's short port syntax, ``ADDR:8000:8000``, takes
    no IPv6 address); else a preflight error."""
    try:
        socket.inet_pton(socket.AF_INET, address)
    except OSError:
        raise _preflight(
            f"bind address {address!r} is not an IPv4 address: give 127.0.0.1 (the default), "
            "an address of this host, or 0.0.0.0 for every address"
        ) from None


def ensure_api_keys(path: Path = API_KEYS_FILE) -> bool:
    """The gateway's API-key file: created with one random key when missing (True), else
    checked to hold a key the gateway's uid can read (a preflight DeployError if not).

    The folder is 0700 (other host users cannot reach the key) and the file 0644: compose
    bind-mounts the file itself, so the container's uid 10001 reads it past the folder.
    """
    folder = path.parent
    created = False
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        if not path.exists():
            # Written beside it and renamed: never half a file, never a file of another mode.
            incoming = folder / f".{path.name}.incoming"
            incoming.write_text(secrets.token_urlsafe(32) + "\n")
            os.chmod(incoming, 0o644)
            incoming.replace(path)
            created = True
        info = path.stat()
        keys = [
            line.strip()
            for line in path.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
    except OSError as exc:
        raise _preflight(f"API-key file {path}: {exc.strerror or exc}") from None
    if not keys:
        raise _preflight(
            f"API-key file {path} holds no key: write one key per line, or remove the file "
            "and deploy again for a random one"
        )
    if info.st_uid != IMAGE_UID and not info.st_mode & stat.S_IROTH:
        raise _preflight(
            f"API-key file {path} is not readable by the gateway (uid {IMAGE_UID}): "
            f"`chmod 0644 {path}` (its folder {folder} stays 0700)"
        )
    return created


# --- deployment ------------------------------------------------------------------------


def fill_wheelhouse(variant: str) -> None:
    """Every wheel the variant's images install, downloaded into build/wheelhouse/."""
    if not WHEELHOUSE_SCRIPT.is_file():
        raise DeployError(
            f"deploy failed: {_relative(WHEELHOUSE_SCRIPT)} is missing: the image build needs "
            "it to fill build/wheelhouse/; nothing was started"
        )
    log = DEPLOY_DIR / "wheelhouse.log"
    print(f"filling the wheelhouse ({variant}; log: {_relative(log)})", flush=True)
    command = [sys.executable, str(WHEELHOUSE_SCRIPT), "--variant", variant]
    # No limit: a cold GPU wheelhouse is gigabytes, and pip gives up on a dead network itself.
    done = _run(command, None, log)
    if done.returncode != 0:
        raise DeployError(
            f"deploy failed: filling the wheelhouse failed: {_last_line(done.stdout)} "
            f"(log: {_relative(log)}); nothing was started"
        )


def stage_model_repository(repository: Path | None) -> None:
    """Put ``repository`` (or nothing: the build exports the demo models) where the image
    build takes it from, replacing what an earlier deployment staged there."""
    if repository is not None and repository.resolve() == STAGED_REPOSITORY.resolve():
        return
    incoming = STAGED_REPOSITORY.with_name(STAGED_REPOSITORY.name + ".incoming")
    try:
        STAGED_REPOSITORY.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(incoming, ignore_errors=True)
        if repository is None:
            incoming.mkdir()
        else:
            # Links are copied as what they point to: the build context cannot follow links out.
            shutil.copytree(repository, incoming)
        shutil.rmtree(STAGED_REPOSITORY, ignore_errors=True)
        incoming.rename(STAGED_REPOSITORY)
    except (OSError, shutil.Error) as exc:
        raise DeployError(
            f"deploy failed: staging the model repository into {_relative(STAGED_REPOSITORY)} "
            f"failed: {exc}; nothing was started"
        ) from None


def _ps(files: Sequence[str]) -> list[dict[str, object]]:
    """``docker compose ps -a`` of the project, one dict per container."""
    try:
        listed = _query([*compose_command(files, PROFILES), "ps", "-a", "--format", "json"])
        text = listed.stdout.strip()
        if listed.returncode != 0 or not text:
            return []
        # Compose prints a JSON array (before 2.21) or one object per line.
        if text.startswith("["):
            entries = json.loads(text)
            return entries if isinstance(entries, list) else []
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (DeployError, ValueError):
        # Without the list no service is named; the stack is taken down all the same.
        return []


#: The order compose starts the services in (depends_on): the first one in trouble is the cause.
START_ORDER = ("torchserve", "gateway", "prometheus")


def failed_service(entries: Sequence[dict[str, object]], timeout_s: float) -> tuple[str, str]:
    """(service, what happened to it) for the service that kept the stack from being healthy,
    or ("", "") when every container looks fine. Services are looked at in the order they
    start: a gateway still starting because TorchServe never became healthy is not the cause."""
    in_start_order = sorted(
        entries,
        key=lambda entry: (
            START_ORDER.index(str(entry.get("Service")))
            if entry.get("Service") in START_ORDER
            else len(START_ORDER)
        ),
    )

    def of(state: str | None = None, health: str | None = None) -> dict[str, object] | None:
        for entry in in_start_order:
            if (state is None or entry.get("State") == state) and (
                health is None or entry.get("Health") == health
            ):
                return entry
        return None

    if found := of(state="restarting"):
        return str(found["Service"]), f"keeps restarting (exit code {found.get('ExitCode')})"
    for state in ("exited", "dead"):
        if found := of(state=state):
            return str(found["Service"]), f"exited with code {found.get('ExitCode')}"
    if found := of(health="unhealthy"):
        return str(found["Service"]), "did not become healthy: its health check failed"
    if found := of(health="starting"):
        return str(found["Service"]), f"did not become healthy within {timeout_s} s"
    return "", ""


def _save_logs(files: Sequence[str], entries: Sequence[dict[str, object]]) -> None:
    """Each service's logs (every replica) in build/deploy/<service>.log."""
    for service in sorted({str(entry["Service"]) for entry in entries}):
        log = DEPLOY_DIR / f"{service}.log"
        try:
            _run(
                [*compose_command(files, PROFILES), "logs", "--no-color", "--timestamps", service],
                QUERY_TIMEOUT_S * 2,
                log,
            )
        except subprocess.TimeoutExpired:
            continue


def leftovers() -> list[str]:
    """This project's containers and networks still on the engine."""
    label = f"label={PROJECT_LABEL}"
    containers = _query(["docker", "ps", "--all", "--filter", label, "--format", "{{.Names}}"])
    networks = _query(["docker", "network", "ls", "--filter", label, "--format", "{{.Name}}"])
    return [f"container {name}" for name in containers.stdout.split()] + [
        f"network {name}" for name in networks.stdout.split()
    ]


def _take_down(files: Sequence[str]) -> list[str]:
    """Remove the project's containers and networks (volumes stay); what is still left."""
    command = [*compose_command(files, PROFILES), "down", "--remove-orphans"]
    # A down that hangs is reported by what it left.
    with contextlib.suppress(subprocess.TimeoutExpired):
        _run(command, DOWN_TIMEOUT_S, DEPLOY_DIR / "down.log")
    return leftovers()


def _fail_and_take_down(
    files: Sequence[str], reason: str, timeout_s: float, elapsed_s: float | None = None
) -> DeployError:
    """After a failed start: the logs saved, the stack taken down, the one line. The service
    that failed is named where ``docker compose ps`` shows one; ``elapsed_s`` None means the
    start was interrupted, so ``reason`` is the cause whatever the services show."""
    entries = _ps(files)
    service, what = failed_service(entries, timeout_s)
    _save_logs(files, entries)
    # A service still starting is the culprit only once the whole wait is spent.
    starting = what.startswith("did not become healthy within")
    if service and elapsed_s is not None and not (starting and elapsed_s < timeout_s):
        message = f"{service} {what} (logs: {_relative(DEPLOY_DIR / f'{service}.log')})"
    else:
        message = f"{reason} (log: {_relative(DEPLOY_DIR / 'up.log')})"
    left = _take_down(files)
    outcome = (
        "nothing left running"
        if not left
        else f"could not remove {', '.join(left)}: run `python3 tools/deploy.py down`"
    )
    return DeployError(f"deploy failed: {message}; {outcome}")


def up(
    variant: str,
    model_repository: Path | None = None,
    timeout_s: int = DEFAULT_TIMEOUT_S,
    scale: int = 1,
    profiles: Sequence[str] = (),
    bind_address: str = DEFAULT_BIND_ADDRESS,
) -> Deployment:
    """Check the host, build the images, start the stack and wait until it is healthy; the
    gateway's ports bind ``bind_address``.

    Raises :class:`DeployError` (exit_code 2: a check failed, nothing done; 1: the deployment
    failed and was taken down)."""
    if variant not in COMPOSE_FILES:
        raise _preflight(f"unknown variant {variant!r}: use one of {', '.join(COMPOSE_FILES)}")
    if timeout_s < 1:
        raise _preflight(f"--timeout {timeout_s}: give the seconds to wait, at least 1")
    if scale < 1:
        raise _preflight(f"--scale {scale}: at least one TorchServe replica is needed")
    unknown = sorted(set(profiles) - set(PROFILES))
    if unknown:
        raise _preflight(f"unknown profile {unknown[0]!r}: use {', '.join(PROFILES)}")
    profiles = tuple(dict.fromkeys(profiles))
    files = COMPOSE_FILES[variant]
    check_bind_address(bind_address)
    _ENV[BIND_ADDRESS_ENV] = bind_address

    check_docker()
    if variant == "gpu":
        check_gpu_support()
    if model_repository is not None:
        check_model_repository(model_repository)
    check_ports(profiles, bind_address)
    ensure_base_image()
    if ensure_api_keys():
        print(f"created the gateway's API-key file {_relative(API_KEYS_FILE)}", flush=True)

    fill_wheelhouse(variant)
    stage_model_repository(model_repository)

    compose = compose_command(files, profiles, progress=True)
    build_log = DEPLOY_DIR / "build.log"
    print(f"building the images (log: {_relative(build_log)})", flush=True)
    started = time.monotonic()
    built = _run([*compose, "build"], None, build_log)
    build_s = time.monotonic() - started
    if built.returncode != 0:
        raise DeployError(
            f"deploy failed: the image build failed: {_last_line(built.stdout)} "
            f"(log: {_relative(build_log)}); nothing was started"
        )

    print(
        f"starting the stack ({scale} TorchServe replica(s)); waiting up to {timeout_s} s "
        "for every service to be healthy",
        flush=True,
    )
    command = [*compose, "up", "--detach", "--wait", "--wait-timeout", f"{timeout_s}"]
    command += ["--scale", f"torchserve={scale}"]
    started = time.monotonic()
    try:
        waited = _run(command, timeout_s + COMPOSE_MARGIN_S, DEPLOY_DIR / "up.log")
    except subprocess.TimeoutExpired:
        reason = f"docker compose up did not return within {timeout_s + COMPOSE_MARGIN_S} s"
        raise _fail_and_take_down(files, reason, timeout_s, time.monotonic() - started) from None
    except KeyboardInterrupt:
        raise _fail_and_take_down(files, "interrupted while starting", timeout_s) from None
    healthy_s = time.monotonic() - started
    if waited.returncode != 0:
        reason = f"docker compose up failed: {_last_line(waited.stdout)}"
        raise _fail_and_take_down(files, reason, timeout_s, healthy_s)
    return Deployment(variant, scale, profiles, build_s, healthy_s, bind_address)


def down() -> list[str]:
    """Remove the stack's containers and networks; the named volumes kept. Raises
    :class:`DeployError` when a container or network of the project is left."""
    check_docker()
    left = _take_down(tuple(dict.fromkeys(f for fs in COMPOSE_FILES.values() for f in fs)))
    if left:
        raise DeployError(
            f"undeploy left {', '.join(left)} (log: {_relative(DEPLOY_DIR / 'down.log')}): "
            "remove them with `docker rm -f` / `docker network rm`"
        )
    volumes = _query(
        ["docker", "volume", "ls", "--filter", f"label={PROJECT_LABEL}", "--format", "{{.Name}}"]
    )
    return volumes.stdout.split()


# --- command line ----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/deploy.py", description=__doc__.splitlines()[0] if __doc__ else None
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="check the host, build, start, wait until healthy")
    start.add_argument("--variant", choices=sorted(COMPOSE_FILES), required=True)
    start.add_argument(
        "--model-repository",
        type=Path,
        help="model repository to bake into the images (default: the demo models)",
    )
    start.add_argument(
        "--timeout",
        type=int,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for every service to be healthy (default: %(default)s)",
    )
    start.add_argument(
        "--scale", type=int, default=1, metavar="N", help="TorchServe replicas (default: 1)"
    )
    start.add_argument(
        "--profile", action="append", default=[], choices=PROFILES, help="compose profile"
    )
    start.add_argument(
        "--bind-address",
        default=DEFAULT_BIND_ADDRESS,
        metavar="ADDR",
        help="host address the gateway's ports bind (default: %(default)s, this host only; "
        "0.0.0.0: every address, reachable by anyone who reaches the host)",
    )
    commands.add_parser("down", help="remove the stack's containers and networks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "down":
            volumes = down()
            print(f"{PROJECT} is down: no container or network of it is left")
            if volumes:
                print(
                    f"named volumes kept: {', '.join(volumes)} "
                    f"(remove them with `docker volume rm {' '.join(volumes)}`)"
                )
            return 0
        deployment = up(
            args.variant,
            args.model_repository,
            args.timeout,
            args.scale,
            args.profile,
            args.bind_address,
        )
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    replicas = f"{deployment.scale} TorchServe replica{'s' if deployment.scale > 1 else ''}"
    print(f"{PROJECT} is up ({deployment.variant}, {replicas}):")
    for what, where in deployment.endpoints():
        print(f"  {what:<11} {where}")
    for line in deployment.how_to_call():
        print(line)
    if deployment.bind_address != DEFAULT_BIND_ADDRESS:
        print(
            f"warning: the gateway's ports bind {deployment.bind_address}: whoever reaches "
            "this host on them reaches the gateway (the key still guards every call but "
            "health, in plaintext unless the gateway has TLS)"
        )
    print(f"build {deployment.build_s:.0f} s, healthy after {deployment.healthy_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
