"""The layers hold: each folder imports only the layers below it, and the lowest ones no
transport (docs/architecture.md, "Layers"). tools/layers.py draws the same graph for people."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = runpy.run_path(str(ROOT / "tools" / "layers.py"))
TRANSPORTS = {"<grpc>", "<fastapi>", "<starlette>", "<uvicorn>"}

BASE = {"cnnserve.errors"}
MODEL = BASE | {"models"}
WIRE = MODEL | {"protocol", "<grpc>"}
#: What each node may import. The CLI on top may import anything, so it has no row.
ALLOWED: dict[str, set[str]] = {
    "cnnserve": set(),
    "cnnserve.__main__": {"cnnserve.cli"},
    "cnnserve.errors": set(),
    "cnnserve.settings": set(),
    "cnnserve.logs": set(),
    "cnnserve.setting_flags": {"cnnserve.settings"},
    # Spans for the gateway and its calls to TorchServe; OpenTelemetry itself only when on.
    "cnnserve.tracing": BASE | {"cnnserve.settings"},
    "models": BASE,
    "training": MODEL,
    "export": MODEL,
    "protocol": WIRE,
    "handlers": MODEL | {"protocol"},
    "client": WIRE,
    "torchserve_engine": WIRE | {"handlers", "cnnserve.settings", "cnnserve.tracing"},
    "gateway": WIRE
    | TRANSPORTS
    | {"torchserve_engine", "cnnserve.settings", "cnnserve.logs", "cnnserve.tracing"},
    "bench": WIRE | {"client", "export", "torchserve_engine", "training", "cnnserve.settings"},
}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """The folder dependency graph of the working tree."""
    edges: dict[str, set[str]] = LAYERS["graph"]()
    return edges


def test_every_node_has_a_rule(graph: dict[str, set[str]]) -> None:
    """A new folder or top-level module must be placed in a layer before it lands."""
    assert set(graph) - {"cnnserve.cli"} == set(ALLOWED)


@pytest.mark.parametrize("node", sorted(ALLOWED))
def test_imports_stay_in_lower_layers(graph: dict[str, set[str]], node: str) -> None:
    assert graph[node] <= ALLOWED[node], f"{node} imports {sorted(graph[node] - ALLOWED[node])}"


def test_client_and_bench_never_import_the_server(graph: dict[str, set[str]]) -> None:
    assert "gateway" not in graph["client"] | graph["bench"]


def test_the_graph_sees_relative_and_from_imports(tmp_path: Path) -> None:
    """The scanner resolves ``from .x import`` and ``from cnnserve import x`` (else the rules
    above could pass on a graph with edges missing)."""
    (tmp_path / "low").mkdir()
    (tmp_path / "high").mkdir()
    (tmp_path / "src" / "cnnserve").mkdir(parents=True)
    (tmp_path / "src" / "cnnserve" / "__init__.py").write_text("")
    (tmp_path / "src" / "cnnserve" / "errors.py").write_text("")
    (tmp_path / "low" / "__init__.py").write_text("from cnnserve import errors\n")
    (tmp_path / "low" / "a.py").write_text("from .b import thing\nimport grpc\n")
    (tmp_path / "low" / "b.py").write_text("thing = 1\n")
    (tmp_path / "high" / "__init__.py").write_text("")
    (tmp_path / "high" / "c.py").write_text("from cnnserve.low.a import thing\n")
    (tmp_path / "pyproject.toml").write_text(
        "[tool.setuptools.package-dir]\n"
        'cnnserve = "src/cnnserve"\n"cnnserve.low" = "low"\n"cnnserve.high" = "high"\n'
    )
    assert LAYERS["graph"](tmp_path) == {
        "cnnserve": set(),
        "cnnserve.errors": set(),
        "low": {"cnnserve.errors", "<grpc>"},
        "high": {"low"},
    }


def test_models_and_handlers_load_no_transport() -> None:
    """Importing every module of models/ and handlers/ (as a TorchServe worker does) pulls in
    no transport library, directly or through another module."""
    probe = (
        "import importlib, json, pkgutil, sys\n"
        "import cnnserve.models, cnnserve.handlers\n"
        "for package in (cnnserve.models, cnnserve.handlers):\n"
        "    for module in pkgutil.iter_modules(package.__path__):\n"
        "        importlib.import_module(f'{package.__name__}.{module.name}')\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'grpc', 'fastapi', 'starlette', 'uvicorn'})))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(loaded) == []
