"""Write the images' exact, hash-checked dependency pins, ``deploy/requirements/<lock>.txt``.

Each image installs one of these files with ``pip install --no-index --no-deps
--require-hashes`` from the wheelhouse the host fills (tools/wheelhouse.py), so every package in
an image is pinned here, nothing is resolved at build time and every file is checked against the
hash recorded here. Each lock is a set of pyproject.toml's extras (the core dependencies always),
resolved by pip for CPython 3.11 on x86-64 Linux, the images' platform:

- ``gateway``: ``cnnserve[gateway,tracing]`` — no torch, no TorchServe;
- ``torchserve-cpu``: ``cnnserve[torchserve]`` with ``torch==2.13.0+cpu``;
- ``torchserve-gpu``: ``cnnserve[torchserve]`` with PyPI's ``torch==2.13.0`` (CUDA 13.0, its
  ``nvidia-*`` libraries pinned too) and ``onnxruntime-gpu`` in place of ``onnxruntime``: both
  provide the module ``onnxruntime`` and must never be installed together;
- ``build``: ``cnnserve[torchserve,export]`` on the CPU, plus the build system's requirements:
  the stage that builds cnnserve's wheel, exports and archives the model repository.

Run ``make deploy-lock`` after changing pyproject.toml's dependencies; ``tests/deploy`` fails
while a lock no longer satisfies them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK_DIR = ROOT / "deploy" / "requirements"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
#: The newest onnxruntime-gpu on PyPI; built for CUDA 13, as torch 2.13.0's PyPI wheel is.
ONNXRUNTIME_GPU = "onnxruntime-gpu==1.31.1"


@dataclass(frozen=True)
class Lock:
    """One lock file: the extras it installs and the build it is for."""

    name: str
    extras: tuple[str, ...]
    gpu: bool = False
    with_build_system: bool = False


LOCKS = (
    Lock("gateway", ("gateway", "tracing")),
    Lock("torchserve-cpu", ("torchserve",)),
    Lock("torchserve-gpu", ("torchserve",), gpu=True),
    Lock("build", ("torchserve", "export"), with_build_system=True),
)


def load_pyproject(root: Path = ROOT) -> dict[str, object]:
    with (root / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def requirements_of(extras: tuple[str, ...], pyproject: dict[str, object]) -> list[Requirement]:
    """The core dependencies plus ``extras``, self-references (``cnnserve[a,b]``) expanded."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    own_name = canonicalize_name(project["name"])
    optional = project.get("optional-dependencies", {})
    pending = [Requirement(text) for text in project["dependencies"]]
    seen_extras: set[str] = set()
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"error: pyproject.toml has no extra {extra!r}")
        pending.append(Requirement(f"{project['name']}[{extra}]"))
    result: list[Requirement] = []
    while pending:
        requirement = pending.pop(0)
        if canonicalize_name(requirement.name) != own_name:
            result.append(requirement)
            continue
        for extra in sorted(requirement.extras - seen_extras):
            seen_extras.add(extra)
            pending += [Requirement(text) for text in optional[extra]]
    return result


def requirement_lines(lock: Lock, pyproject: dict[str, object]) -> list[str]:
    """The requirement lines pip resolves for ``lock``, with the variant's swaps."""
    lines = []
    for requirement in requirements_of(lock.extras, pyproject):
        if not lock.gpu and requirement.name == "torch":
            lines.append(f"torch{requirement.specifier}+cpu")
        elif lock.gpu and requirement.name == "onnxruntime":
            lines.append(ONNXRUNTIME_GPU)
        else:
            lines.append(str(requirement))
    if lock.with_build_system:
        build_system = pyproject["build-system"]
        assert isinstance(build_system, dict)
        lines += build_system["requires"]
    return sorted(set(lines))


def resolve(lock: Lock, lines: list[str]) -> dict[str, tuple[str, str]]:
    """Package name → (exact version, ``sha256:…`` of the file pip chose) for ``lines``."""
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
    # One try per index: an unreachable index then costs seconds, not minutes, and a missing
    # package still fails the resolution loudly. Wheels only: the images build nothing.
    command += ["--quiet", "--retries", "0", "--only-binary", ":all:", "--report", "-"]
    env = dict(os.environ)
    if not lock.gpu:
        command += ["--extra-index-url", CPU_INDEX]
    else:
        # A local "+cpu" wheel (find-links in a pip config or PIP_* variable) satisfies
        # torch==2.13.0 too, and pip prefers it: resolve the GPU variant with pip's defaults,
        # from PyPI alone.
        env = {name: value for name, value in env.items() if not name.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull
    result = subprocess.run([*command, *lines], env=env, check=True, capture_output=True, text=True)
    report = json.loads(result.stdout)
    pins = {}
    for item in report["install"]:
        archive = item["download_info"].get("archive_info", {})
        digest = archive.get("hashes", {}).get("sha256")
        if digest is None:
            raise SystemExit(f"error: pip reported no sha256 for {item['download_info']['url']}")
        name = canonicalize_name(item["metadata"]["name"])
        pins[name] = (item["metadata"]["version"], f"sha256:{digest}")
    return pins


def lock_text(lock: Lock, pins: dict[str, tuple[str, str]]) -> str:
    """The lock file's text: a header, then ``name==version --hash=…`` lines sorted by name."""
    extras = ",".join(lock.extras)
    header = [
        "# Generated by `make deploy-lock` (deploy/lock.py) from pyproject.toml; do not edit.",
        f"# cnnserve[{extras}]{' for CUDA' if lock.gpu else ' on the CPU'}: installed into the",
        "# images with `pip install --no-index --no-deps --require-hashes` from the wheelhouse.",
    ]
    body = [f"{name}=={pins[name][0]} --hash={pins[name][1]}" for name in sorted(pins)]
    return "\n".join(header + body) + "\n"


def main() -> None:
    """Resolve and write every lock file (or only those named on the command line)."""
    if (sys.version_info[:2], platform.machine(), sys.platform) != ((3, 11), "x86_64", "linux"):
        sys.exit(
            "error: deploy/lock.py resolves for the images' platform; "
            "run it with CPython 3.11 on x86-64 Linux"
        )
    wanted = set(sys.argv[1:]) or {lock.name for lock in LOCKS}
    pyproject = load_pyproject()
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for lock in LOCKS:
        if lock.name not in wanted:
            continue
        pins = resolve(lock, requirement_lines(lock, pyproject))
        path = LOCK_DIR / f"{lock.name}.txt"
        path.write_text(lock_text(lock, pins))
        print(f"{path.relative_to(ROOT)}: {len(pins)} packages")


if __name__ == "__main__":
    main()
