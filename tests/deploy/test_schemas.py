"""The KServe, Prometheus Operator and Grafana objects against their published schemas.

Offline: the CRDs and the dashboard schema are vendored (tests/deploy/schemas/README.md says
from where). ``kubernetes-validate`` knows Kubernetes' own kinds only, so these objects are
checked here with ``jsonschema``: each against its CRD's ``openAPIV3Schema``, unknown fields
rejected as ``kubectl apply --validate=strict`` rejects them. A broken copy of each object
must fail, or the check proves nothing.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cnnserve.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "cnnserve.json"
#: Object file → the vendored CRD of its kind.
OBJECTS = {
    K8S / "kserve" / "servingruntime.yaml": "serving.kserve.io_servingruntimes.yaml",
    K8S / "kserve" / "inferenceservice.yaml": "serving.kserve.io_inferenceservices.yaml",
    K8S / "monitoring" / "servicemonitor.yaml": "monitoring.coreos.com_servicemonitors.yaml",
}
PRESERVE = "x-kubernetes-preserve-unknown-fields"


def load_yaml(path: Path) -> Any:
    # libyaml's loader: the InferenceService CRD is 2 MB, half a minute for the Python one.
    return yaml.load(path.read_text(), Loader=yaml.CSafeLoader)


def closed(schema: Any) -> Any:
    """``schema`` with every object schema that lists ``properties``, and neither allows
    other fields nor preserves unknown ones, closed to fields it does not list."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: closed(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and not schema.get(PRESERVE):
        result["additionalProperties"] = False
    return result


@cache
def crd_validator(crd_file: str, api_version: str) -> jsonschema.Validator:
    """A validator of the ``api_version`` objects of the vendored CRD ``crd_file``."""
    crd = load_yaml(SCHEMAS / crd_file)
    group, _, version = api_version.partition("/")
    assert crd["spec"]["group"] == group, f"{crd_file} is not the CRD of {api_version}"
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            schema = closed(served["schema"]["openAPIV3Schema"])
            return jsonschema.Draft7Validator(schema)
    raise AssertionError(f"{crd_file} has no version {version}")


@cache
def dashboard_validator() -> jsonschema.Validator:
    schema = json.loads((SCHEMAS / "grafana-dashboard.jsonschema.json").read_text())
    return jsonschema.Draft7Validator(schema)


def errors_of(path: Path, document: Any) -> list[str]:
    """What is wrong with ``document`` (the object in ``path``, or a changed copy of it)."""
    if path == DASHBOARD:
        validator = dashboard_validator()
    else:
        validator = crd_validator(OBJECTS[path], document["apiVersion"])
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(document)]


def read(path: Path) -> Any:
    return json.loads(path.read_text()) if path == DASHBOARD else load_yaml(path)


@pytest.mark.parametrize("path", [*OBJECTS, DASHBOARD], ids=lambda p: p.name)
def test_each_object_is_valid_against_its_published_schema(path: Path) -> None:
    assert errors_of(path, read(path)) == []


def _set(document: Any, where: str, value: Any) -> None:
    *parents, last = where.split(".")
    node = document
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value


_DELETE = object()
RUNTIME, ISVC, MONITOR = OBJECTS


@pytest.mark.parametrize(
    ("path", "where", "value"),
    [
        (RUNTIME, "spec.protocolVersions", "v2"),
        (RUNTIME, "spec.supportedModelFormats.0.priority", 0),
        (RUNTIME, "spec.containers.0.ports", [{"port": 8080}]),
        (RUNTIME, "spec.supportedModelFormat", []),
        (ISVC, "spec.predictor.model.modelFormat", {"version": "1"}),
        (ISVC, "spec.predictor.model.storageURI", "pvc://x"),
        (MONITOR, "spec.endpoints.0.scheme", "tcp"),
        (MONITOR, "spec.endpoints.0.interval", "15 seconds"),
        (MONITOR, "spec.selector", _DELETE),
        (DASHBOARD, "schemaVersion", "41"),
        (DASHBOARD, "panels.0.gridPos.w", "half"),
        (DASHBOARD, "templating.list.2.refresh", 5),
        (DASHBOARD, "panels.0.legend", {}),
    ],
    ids=lambda v: v.name if isinstance(v, Path) else None,
)
def test_a_broken_object_fails(path: Path, where: str, value: Any) -> None:
    """One wrong field — a wrong type, a value out of range, a misspelt or missing field —
    is caught."""
    document = copy.deepcopy(read(path))
    _set(document, where, value)
    assert errors_of(path, document) != []


def manifest(path: Path, kind: str, name: str) -> dict[str, Any]:
    """The object ``kind``/``name`` of the YAML file ``path``."""
    for document in yaml.safe_load_all(path.read_text()):
        if document["kind"] == kind and document["metadata"]["name"] == name:
            return dict(document)
    raise AssertionError(f"{path.name} has no {kind}/{name}")


def test_service_monitor_selects_the_gateway_service_s_metrics_port() -> None:
    monitor = load_yaml(MONITOR)
    service = manifest(K8S / "gateway.yaml", "Service", "gateway")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert ports[endpoint["port"]]["port"] == Settings.model_fields["metrics_port"].default
    assert endpoint["path"] == "/metrics"


def runtime_settings() -> Settings:
    """The settings the ServingRuntime's container gives the gateway; a variable that is no
    setting fails (the gateway would ignore it silently)."""
    (container,) = load_yaml(RUNTIME)["spec"]["containers"]
    values = {}
    for entry in container["env"]:
        name = entry["name"].removeprefix("CNNSERVE_").lower()
        assert name in Settings.model_fields, f"{entry['name']} is not a cnnserve setting"
        values[name] = entry["value"]
    return Settings(**values)


def test_serving_runtime_wires_kserve_s_conventions_to_cnnserve_s_settings() -> None:
    runtime = load_yaml(RUNTIME)
    settings = runtime_settings()
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    assert str(settings.model_repository) == "/mnt/models"
    # KServe's default HTTP port, and the gRPC port of its Triton runtime.
    assert (settings.http_port, settings.grpc_port) == (8080, 9000)
    annotations = runtime["spec"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == settings.metrics_port
    assert container["readinessProbe"]["httpGet"]["port"] == settings.http_port
    assert settings.api_keys_file is not None  # closed by default
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in runtime["spec"]["volumes"]}
    assert settings.api_keys_file.parent == Path(mounts["api-keys"])
    assert "secret" in volumes["api-keys"]
    assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}


def test_inference_service_names_a_format_the_runtime_serves() -> None:
    runtime, isvc = load_yaml(RUNTIME), load_yaml(ISVC)
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    served = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in served
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
