"""Print which product folders import which: the folder dependency graph of cnnserve.

Every top-level product folder is one node (``models``, ``protocol``, ``gateway``, ...); the
modules of the top package itself (``cnnserve.cli``, ``cnnserve.errors``, ...) are a node each,
because they sit at different layers. Third-party imports that matter for layering (the
transports: grpc, fastapi, starlette, uvicorn) are listed per folder too.

    python tools/layers.py            # the graph, one "folder -> dependencies" line each
    python tools/layers.py --dot      # the same as Graphviz dot

Reads ``[tool.setuptools.package-dir]`` in pyproject.toml to know which folder is which
package, so it works for any layout that table describes.
"""

from __future__ import annotations

import argparse
import ast
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = "cnnserve"
TRANSPORTS = ("grpc", "fastapi", "starlette", "uvicorn")


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Installed package name → the folder that holds it."""
    with (root / "pyproject.toml").open("rb") as f:
        table = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {package: root / folder for package, folder in table.items()}


def _folders(root: Path) -> set[str]:
    """The product folders' node names (``models``, ``gateway``, ...)."""
    return {package.split(".")[1] for package in package_dirs(root) if package != TOP}


def node_of(module: str, folders: set[str]) -> str | None:
    """The graph node of a ``cnnserve...`` module; None for any other module."""
    parts = module.split(".")
    if parts[0] != TOP:
        return None
    if len(parts) == 1:
        return TOP
    return parts[1] if parts[1] in folders else f"{TOP}.{parts[1]}"


def _source_modules(root: Path) -> dict[str, Path]:
    """Module name → file, for every module of the project."""
    modules: dict[str, Path] = {}
    for package, folder in package_dirs(root).items():
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def _imports(module: str, path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            # ``from cnnserve import errors`` imports the submodule cnnserve.errors.
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Node → the nodes and ``<transport>`` libraries it imports; no self-edges."""
    folders = _folders(root)
    modules = _source_modules(root)
    known = {node_of(module, folders) for module in modules}
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        source = node_of(module, folders)
        assert source is not None
        edges[source]
        for target in _imports(module, path):
            library = target.split(".")[0]
            if library in TRANSPORTS:
                edges[source].add(f"<{library}>")
                continue
            node = node_of(target, folders)
            if node in known and node not in (source, TOP):
                edges[source].add(node)
    return dict(edges)


def main() -> None:
    """Print the graph as text or dot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dot", action="store_true", help="print Graphviz dot")
    args = parser.parse_args()
    edges = graph()
    if args.dot:
        print("digraph cnnserve {")
        for source in sorted(edges):
            for target in sorted(edges[source]):
                print(f'  "{source}" -> "{target}";')
        print("}")
        return
    width = max(len(source) for source in edges)
    for source in sorted(edges):
        print(f"{source:<{width}} -> {', '.join(sorted(edges[source])) or '(nothing)'}")


if __name__ == "__main__":
    main()
