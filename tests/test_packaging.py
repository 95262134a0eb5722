"""Each part of cnnserve installs and runs with its own extra (pyproject.toml's optional
dependencies) and nothing more.

Statically, from the source: every third-party module the package imports is declared, and
what each part imports when it loads comes from the core dependencies and the part's extra.
For real, in processes where the other extras' modules are hidden (tests/not_installed): a
gateway serves without torch, ``cnnserve predict`` and the client run on the core alone, and
a command whose extra is missing says in one line which extra to install.
"""

from __future__ import annotations

import ast
import importlib.metadata
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cnnserve.models.scenes import shapes_scene
from tests.images import digit_png, shapes_png
from tests.support import GatewayProcess, free_ports, gateway_process, stop_process, wait_until

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PROJECT["tool"]["setuptools"]["package-dir"]
CORE: list[str] = PROJECT["project"]["dependencies"]
EXTRAS: dict[str, list[str]] = PROJECT["project"]["optional-dependencies"]
NAME = PROJECT["project"]["name"]

#: The extra each part of the package comes with (the longest matching prefix counts). The
#: ``client`` extra is the core dependencies alone.
PARTS = {
    "cnnserve": "client",  # the command line, settings and errors
    "cnnserve.client": "client",
    "cnnserve.protocol": "client",
    # Specs, images and the repository's configs; the networks and weights need torch.
    "cnnserve.models": "client",
    "cnnserve.models.networks": "torchscript",
    "cnnserve.models.feature_network": "torchscript",
    "cnnserve.models.checkpoint": "torchscript",
    "cnnserve.models.torchscript": "torchscript",
    "cnnserve.models.batch_buckets": "torchscript",
    "cnnserve.gateway": "gateway",
    "cnnserve.export": "export",
    "cnnserve.training": "train",
    "cnnserve.torchserve_engine": "torchserve",
    "cnnserve.handlers": "torchserve",
    "cnnserve.bench": "bench",
}
#: The functions of ``cnnserve predict`` in the command line module: it runs on the core.
PREDICT_PATH = ("predict", "user_errors")
#: Where a missing extra is caught and named (the functions of this module).
EXTRA_CHECKS = {"needs_extra", "require_extra"}
EXTRA_CHECKS_MODULE = "cnnserve.errors"
NOT_INSTALLED = ROOT / "tests" / "not_installed"


def _distribution(requirement: str) -> tuple[str, list[str]]:
    """A requirement's normalized distribution name and its extras."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", requirement)
    assert match is not None, requirement
    extras = [extra.strip() for extra in (match.group(2) or "").split(",") if extra.strip()]
    return _normalize(match.group(1)), extras


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions(*extras: str) -> set[str]:
    """The distributions ``pip install 'cnnserve[<extras>]'`` asks for, directly or through
    the extras' references to other extras (the core dependencies always)."""
    found = {_distribution(text)[0] for text in CORE}
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in EXTRAS[extra]:
            name, more = _distribution(text)
            if name == NAME:
                pending += more
            else:
                found.add(name)
    return found


@cache
def _providers() -> dict[str, set[str]]:
    """Top-level module → the installed distributions that provide it (this environment has
    every extra installed)."""
    return {
        module: {_normalize(name) for name in names}
        for module, names in importlib.metadata.packages_distributions().items()
    }


def modules_of(dists: Iterable[str]) -> set[str]:
    """The top-level modules the distributions ``dists`` install."""
    wanted = set(dists)
    return {module for module, names in _providers().items() if names & wanted}


def installed_with(*extras: str) -> set[str]:
    """The distributions ``pip install 'cnnserve[<extras>]'`` installs: those it asks for
    and, as this environment's metadata says, what they require in turn."""
    pending, found = list(distributions(*extras)), set()
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        # Requirements of the distribution's own extras are not installed with it.
        pending += [_distribution(r)[0] for r in requires if "extra ==" not in r]
    return found


def hidden_without(*extras: str) -> set[str]:
    """The modules a process with only ``extras`` installed lacks: those of every declared
    distribution it does not install, less any module that an installed one provides too."""
    installed = installed_with(*extras)
    return modules_of(distributions("all") - installed) - modules_of(installed)


def is_third_party(module: str) -> bool:
    top = module.partition(".")[0]
    return top not in sys.stdlib_module_names and top not in {NAME, "__future__"}


# --- the source's imports ------------------------------------------------------------------


@dataclass
class Imports:
    """What one module of the package imports."""

    #: Modules imported when the module itself is imported.
    at_load: set[str] = field(default_factory=set)
    #: Every module it names: imports inside functions and ``TYPE_CHECKING`` too, modules
    #: run with ``python -m`` and modules an extra is checked for.
    anywhere: set[str] = field(default_factory=set)
    #: Each ``needs_extra``/``require_extra``: the extra, the modules checked and the
    #: modules imported inside the ``with`` block.
    extra_checks: list[tuple[str, set[str]]] = field(default_factory=list)


def module_files() -> dict[str, Path]:
    """Every module of the package → its file."""
    files = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            files[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return files


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> set[str]:
    """The absolute names an import statement loads (``from x import y``: ``x`` and, when it
    is a module, ``x.y``)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        parts = package[: len(package) - node.level + 1]
        base = ".".join([*parts, node.module] if node.module else parts)
    return {base} | {f"{base}.{alias.name}" for alias in node.names}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _extra_call(node: ast.AST, module: str) -> tuple[str, set[str]] | None:
    """``needs_extra("x", what, "mod", ...)`` → ``("x", {"mod", ...})``."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        return None
    if node.func.id not in EXTRA_CHECKS or module == EXTRA_CHECKS_MODULE:
        return None
    extra, _what, *modules = node.args
    assert isinstance(extra, ast.Constant), ast.unparse(node)
    return str(extra.value), {str(m.value) for m in modules if isinstance(m, ast.Constant)}


def _extra_block(node: ast.With, module: str) -> tuple[str, set[str]] | None:
    """The ``needs_extra(...)`` a ``with`` statement enters, if any."""
    for item in node.items:
        if (checked := _extra_call(item.context_expr, module)) is not None:
            return checked
    return None


def _run_modules(node: ast.List | ast.Tuple) -> set[str]:
    """Modules a command line runs with ``-m``: ``[sys.executable, "-m", "ts.model_server"]``."""
    values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
    return {str(after) for before, after in itertools.pairwise(values) if before == "-m" and after}


def imports_of(module: str, path: Path) -> Imports:
    found = Imports()
    is_package = path.stem == "__init__"

    def visit(node: ast.AST, at_load: bool, block: set[str] | None) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = _targets(node, module, is_package)
            found.anywhere |= names
            if at_load:
                found.at_load |= names
            if block is not None:
                block |= names
            return
        if isinstance(node, ast.List | ast.Tuple):
            found.anywhere |= _run_modules(node)
        if (checked := _extra_call(node, module)) is not None:
            found.anywhere |= checked[1]
        if isinstance(node, ast.Expr) and (checked := _extra_call(node.value, module)):
            found.extra_checks.append(checked)  # a bare require_extra: modules only
        if isinstance(node, ast.If) and _is_type_checking(node):
            at_load = False
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            at_load, block = False, None
        if isinstance(node, ast.With) and (checked := _extra_block(node, module)):
            extra, modules = checked
            found.anywhere |= modules
            inside = set(modules)
            found.extra_checks.append((extra, inside))
            for child in node.body:
                visit(child, at_load, inside)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, at_load, block)

    for node in ast.parse(path.read_text(), str(path)).body:
        visit(node, True, None)
    return found


@cache
def package_imports() -> dict[str, Imports]:
    return {module: imports_of(module, path) for module, path in module_files().items()}


def loaded_with(modules: Iterable[str]) -> set[str]:
    """The third-party modules that importing ``modules`` imports, through the package's own
    modules (and their parent packages) at load time."""
    imports = package_imports()
    pending, seen, third_party = list(modules), set(), set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if is_third_party(name):
            third_party.add(name.partition(".")[0])
            continue
        parts = name.split(".")
        pending += [".".join(parts[:end]) for end in range(1, len(parts))]
        if name in imports:
            pending += imports[name].at_load
    return third_party


def undeclared(modules: Iterable[str], dists: set[str]) -> dict[str, set[str]]:
    """Each of ``modules`` that no distribution in ``dists`` provides → who provides it."""
    providers = _providers()
    return {
        module: providers.get(module, {"(not installed)"})
        for module in modules
        if not providers.get(module, set()) & dists
    }


def part_of(module: str) -> str:
    """The extra of the part ``module`` belongs to."""
    prefixes = [p for p in PARTS if module == p or module.startswith(p + ".")]
    return PARTS[max(prefixes, key=len)]


def _function_imports(path: Path, names: Iterable[str]) -> set[str]:
    """The modules the named functions of ``path`` import."""
    wanted = set(names)
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name in wanted:
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    found |= _targets(inner, "cnnserve.cli", False)
    return found


# --- static checks -------------------------------------------------------------------------


def test_every_package_folder_belongs_to_an_extra() -> None:
    assert set(PACKAGE_DIRS) <= set(PARTS)
    assert set(PARTS.values()) <= set(EXTRAS)


def test_every_import_of_the_package_is_declared() -> None:
    used = {
        name.partition(".")[0]
        for imports in package_imports().values()
        for name in imports.anywhere
        if is_third_party(name)
    }
    assert undeclared(used, distributions("all")) == {}


@pytest.mark.parametrize("module", sorted(module_files()))
def test_each_part_loads_with_its_extra(module: str) -> None:
    extra = part_of(module)
    assert undeclared(loaded_with([module]), distributions(extra)) == {}, (
        f"{module} (part of cnnserve[{extra}]) imports these when it loads"
    )


def client_path() -> set[str]:
    """Everything the client and ``cnnserve predict`` import."""
    client = [m for m in module_files() if part_of(m) == "client"]
    predict = _function_imports(ROOT / PACKAGE_DIRS[NAME] / "cli.py", PREDICT_PATH)
    return loaded_with([*client, *predict])


def test_predict_and_the_client_need_the_core_only() -> None:
    assert undeclared(client_path(), distributions("client")) == {}


def test_the_core_is_what_the_client_needs() -> None:
    """Every core dependency is imported by the client or ``cnnserve predict``; anything else
    belongs in an extra."""
    used = set().union(*(_providers().get(module, set()) for module in client_path()))
    assert distributions() - used == set()


def test_extras_named_by_missing_module_errors_provide_those_modules() -> None:
    """A ``needs_extra`` or ``require_extra`` names an extra that installs the modules it
    checks and everything its block imports."""
    checks = [
        (module, extra, names)
        for module, imports in package_imports().items()
        for extra, names in imports.extra_checks
    ]
    assert checks
    for module, extra, names in checks:
        assert extra in EXTRAS, f"{module}: no extra {extra!r}"
        missing = undeclared(loaded_with(names), distributions(extra))
        assert missing == {}, f"{module}: cnnserve[{extra}] lacks these"


def test_torch_is_pinned_in_one_extra_only() -> None:
    """Every other extra needing torch refers to ``torchscript``, so the one exact pin (any
    other spec downloads a multi-GB CUDA build) cannot drift."""
    pins = [
        (extra, text)
        for extra, texts in {"core": CORE, **EXTRAS}.items()
        for text in texts
        if _distribution(text)[0] == "torch"
    ]
    assert pins == [("torchscript", "torch==2.13.0")]


def test_a_wheel_ships_the_web_page(tmp_path: Path) -> None:
    """The wheel holds every file of the page the gateway serves at ``/`` (package data, which
    setuptools leaves out unless declared), built from the package folders as an image build
    does."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    page = ROOT / PACKAGE_DIRS["cnnserve.gateway"] / "web"
    files = {f"cnnserve/gateway/web/{path.name}" for path in page.iterdir()}
    assert "cnnserve/gateway/web/index.html" in files
    assert files <= shipped


# --- for real, with the other extras' modules hidden ---------------------------------------


def environment(hidden: Iterable[str]) -> dict[str, str]:
    """This process's environment (no ``CNNSERVE_*`` settings) for a child that lacks the
    ``hidden`` modules."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNNSERVE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NOT_INSTALLED), env.get("PYTHONPATH")]))
    env["TEST_NOT_INSTALLED"] = ",".join(sorted(hidden))
    return env


def cnnserve(
    *args: str, hidden: Iterable[str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cnnserve", *args],
        env=environment(hidden),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


#: Without the extras the gateway does not need: torch, onnx, scikit-learn, TorchServe, ...
SERVER_HIDDEN = hidden_without("gateway")
#: With the core dependencies alone.
CLIENT_HIDDEN = hidden_without("client")


def test_the_hidden_modules_are_what_the_extras_leave_out() -> None:
    assert {"torch", "onnx", "onnxscript", "sklearn", "tqdm", "matplotlib", "ts"} <= SERVER_HIDDEN
    assert "model_archiver" in SERVER_HIDDEN
    assert {"onnxruntime", "fastapi", "starlette", "uvicorn", "prometheus_client", "yaml"} <= (
        CLIENT_HIDDEN
    )
    assert not {"numpy", "grpc", "google", "httpx", "PIL"} & CLIENT_HIDDEN


def test_a_hidden_module_cannot_be_imported_or_found() -> None:
    probe = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('torch') is None\n"
        "import numpy\n"
        "import torch\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env=environment(["torch"]),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().endswith("ModuleNotFoundError: No module named 'torch'")


@pytest.fixture(scope="module")
def gateway_without_torch(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """``cnnserve serve --backend onnxruntime`` with none of the modules the gateway's extra
    leaves out (torch, onnx, scikit-learn, TorchServe, matplotlib, ...)."""
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment(SERVER_HIDDEN).items():
            patch.setenv(name, value)
        with gateway_process(
            "onnxruntime", log, model_repository=model_repository, device="cpu"
        ) as gateway:
            yield gateway
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_predict_classifies_through_a_gateway_without_torch_on_the_core_alone(
    gateway_without_torch: GatewayProcess, tmp_path: Path, transport: str
) -> None:
    png, label = digit_png(0)
    image = tmp_path / "digit.png"
    image.write_bytes(png)
    http = transport == "http"
    port = gateway_without_torch.http_port if http else gateway_without_torch.grpc_port
    flags = ["--http"] if http else []
    result = cnnserve(
        "predict", *flags, "--port", str(port), "--model", "convnet", str(image),
        hidden=CLIENT_HIDDEN,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{image}: {label} (")


def test_predict_writes_a_mask_on_the_core_alone(
    gateway_without_torch: GatewayProcess, tmp_path: Path
) -> None:
    image = tmp_path / "scene.png"
    image.write_bytes(shapes_png(side=40)[0])
    result = cnnserve(
        "predict", "--http", "--port", str(gateway_without_torch.http_port), "--model", "fcn",
        str(image), hidden=CLIENT_HIDDEN,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "scene.mask.png").stat().st_size > 0


def test_pictures_are_drawn_by_a_gateway_without_torch(
    gateway_without_torch: GatewayProcess,
) -> None:
    """A layer's grid and the FCN's demo scene, whose generator is the training data's: the
    gateway's extra alone draws them (no torch, no scikit-learn)."""
    base = f"http://127.0.0.1:{gateway_without_torch.http_port}"
    scene = httpx.get(f"{base}/demo/scene.png", params={"seed": 3, "size": 40}, timeout=60)
    assert scene.status_code == 200, scene.text
    drawn = np.asarray(Image.open(io.BytesIO(scene.content)))
    assert np.array_equal(drawn, shapes_scene(np.random.default_rng(3), 40)[0])
    grid = httpx.post(
        f"{base}/predict/fcn/features", params={"layer": "conv1"}, content=scene.content, timeout=60
    )
    assert grid.status_code == 200, grid.text
    assert grid.headers["X-Layer-Shape"] == "32,38,38"


def test_the_client_module_runs_on_the_core_alone(gateway_without_torch: GatewayProcess) -> None:
    probe = (
        "import sys\n"
        "import numpy as np\n"
        "from cnnserve.client.inference import connect\n"
        "with connect('127.0.0.1', int(sys.argv[1])) as client:\n"
        "    out = client.infer('convnet', {'pixels': np.zeros((2, 3, 28, 28), np.uint8)})\n"
        "print(len(out['labels']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(gateway_without_torch.grpc_port)],
        env=environment(CLIENT_HIDDEN),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"


#: Commands whose help is checked on the core alone: the light ones and those with many options.
HELP_ON_THE_CORE = (
    "predict",
    "serve",
    "config",
    "soak",
    "overload",
    "hotpath",
    "scaling",
    "gpu-check",
)


@pytest.mark.parametrize("args", [["--help"], *([name, "--help"] for name in HELP_ON_THE_CORE)])
def test_help_works_on_the_core_alone(args: list[str]) -> None:
    result = cnnserve(*args, hidden=CLIENT_HIDDEN)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_config_and_version_work_on_the_core_alone() -> None:
    result = cnnserve("config", "--json", "--grpc-port", "9001", hidden=CLIENT_HIDDEN)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["grpc_port"]["source"] == "flag"
    result = cnnserve("--version", hidden=CLIENT_HIDDEN)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("cnnserve ")


def test_the_torchserve_backend_runs_without_torch(model_repository: Path, tmp_path: Path) -> None:
    """The gateway with the torchserve backend starts and answers without torch (no
    TorchServe runs here, so its models are not ready: the point is that it serves)."""
    grpc_port, http_port, metrics_port = free_ports(3)
    env = environment(SERVER_HIDDEN)
    # TorchServe registers archives built elsewhere, as in the deployment's gateway image.
    env["CNNSERVE_TORCHSERVE_REGISTRATION"] = "false"
    env["CNNSERVE_MODEL_STORE_DIR"] = str(tmp_path / "store")
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "cnnserve", "serve", "--backend", "torchserve",
                "--model-repository", str(model_repository), "--grpc-port", str(grpc_port),
                "--http-port", str(http_port), "--metrics-port", str(metrics_port),
            ],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{http_port}"

    def live() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(f"{base}/v2/health/live", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(live, 60, "the torchserve-backend gateway to answer")
        ready = httpx.get(f"{base}/v2/models/convnet/ready", timeout=5)
        assert ready.status_code == 503
    finally:
        assert stop_process(process, 30) == 0
    assert "Traceback" not in log.read_text()


def _error_line(extra: str, what: str, module: str = r"\w+") -> str:
    return (
        rf"error: {what} needs '{module}', which is not installed: "
        rf"pip install 'cnnserve\[{extra}\]'"
    )


def test_export_without_torch_names_its_extra(tmp_path: Path) -> None:
    result = cnnserve("export", "convnet", "--out", str(tmp_path / "out"), hidden=SERVER_HIDDEN)
    assert result.returncode == 2
    assert re.fullmatch(_error_line("export", "cnnserve export", "torch"), result.stderr.strip())


def test_export_without_onnxscript_writes_nothing(tmp_path: Path) -> None:
    """torch imports onnxscript only while it exports: checked before anything is written."""
    out = tmp_path / "out"
    result = cnnserve("export", "convnet", "--out", str(out), hidden=["onnxscript"])
    assert result.returncode == 2
    expected = _error_line("export", "an ONNX export", "onnxscript")
    assert re.fullmatch(expected, result.stderr.strip())
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "convnet"], _error_line("train", "cnnserve train", "torch")),
        (["bench", "--report-only"], _error_line("bench", "cnnserve bench", "matplotlib")),
        (["torchserve", "start"], _error_line("torchserve", "TorchServe", "ts")),
        (["torchserve", "status"], _error_line("torchserve", "cnnserve torchserve")),
        (["soak"], _error_line("bench", "cnnserve soak")),
        (["overload"], _error_line("bench", "cnnserve overload")),
        (["hotpath"], _error_line("bench", "cnnserve hotpath")),
        (["scaling"], _error_line("bench", "cnnserve scaling")),
        (["gpu-check", "--out", "gpu"], _error_line("torchscript", "cnnserve gpu-check", "torch")),
    ],
)
def test_commands_without_their_extra_say_which_to_install(
    args: list[str], expected: str, tmp_path: Path
) -> None:
    hidden = SERVER_HIDDEN if args[0] != "torchserve" or args[1] == "start" else CLIENT_HIDDEN
    result = cnnserve(*args, "--help", hidden=hidden)
    assert result.returncode == 0  # the help needs none of it
    result = cnnserve(*args, hidden=hidden, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert re.fullmatch(expected, result.stderr.strip())


def test_archive_without_the_archiver_names_its_extra(
    model_repository: Path, tmp_path: Path
) -> None:
    result = cnnserve(
        "archive", "--repository", str(model_repository), "--model-store", str(tmp_path),
        hidden=SERVER_HIDDEN,
    )  # fmt: skip
    assert result.returncode == 2
    expected = _error_line("torchserve", "archiving for TorchServe", "model_archiver")
    assert re.fullmatch(expected, result.stderr.strip())
    assert list(tmp_path.iterdir()) == []


def _serve(*args: str, hidden: Iterable[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    ports = free_ports(3)
    flags = ["--grpc-port", str(ports[0]), "--http-port", str(ports[1])]
    return cnnserve("serve", *args, *flags, "--metrics-port", str(ports[2]), hidden=hidden, cwd=cwd)


def test_serve_without_the_gateway_extra_names_it(tmp_path: Path) -> None:
    result = _serve(hidden=CLIENT_HIDDEN, cwd=tmp_path)
    assert result.returncode == 2
    assert re.fullmatch(_error_line("gateway", "cnnserve serve"), result.stderr.strip())


def test_the_torchscript_backend_without_torch_names_its_extra(
    model_repository: Path, tmp_path: Path
) -> None:
    result = _serve(
        "--backend", "torchscript", "--model-repository", str(model_repository),
        hidden=SERVER_HIDDEN, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(_error_line("torchscript", "the torchscript backend", "torch"), last)
    assert "Traceback" not in result.stderr


def test_the_default_repository_without_the_export_extra_is_not_made(tmp_path: Path) -> None:
    result = _serve("--backend", "onnxruntime", hidden=SERVER_HIDDEN, cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    what = "making the default model repository model_repository"
    assert re.fullmatch(_error_line("export", what, "torch"), last)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "model_repository").exists()
