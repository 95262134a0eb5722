"""No code path of cnnserve unpickles: checked over the source of every package folder.

``np.load`` must say ``allow_pickle=False``, ``torch.load`` must say ``weights_only=True``, and
nothing imports ``pickle`` (or its relatives) at all — a pickle from a request, an archive or a
checkpoint would run code.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cnnserve.errors import InvalidInputError
from cnnserve.handlers.packing import unpack

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
    "package-dir"
].values()
#: Modules that deserialize arbitrary Python objects.
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
#: ``module.function`` → the keyword and value it must be called with.
REQUIRED_KEYWORDS = {
    ("np", "load"): ("allow_pickle", False),
    ("numpy", "load"): ("allow_pickle", False),
    ("torch", "load"): ("weights_only", True),
}


def sources() -> Iterator[Path]:
    """Every Python file of the installed package (generated stubs included)."""
    for folder in PACKAGE_DIRS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_the_scan_sees_the_package() -> None:
    files = list(sources())
    assert len(files) > 40
    assert ROOT / "handlers" / "packing.py" in files


@pytest.mark.parametrize("path", list(sources()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_call_can_unpickle(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else names
            for module in modules:
                assert module.split(".")[0] not in UNPICKLERS, f"{path}:{node.lineno} {module}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if not isinstance(owner, ast.Name):
                continue
            required = REQUIRED_KEYWORDS.get((owner.id, node.func.attr))
            if required is None:
                continue
            keyword, value = required
            given = {k.arg: k.value for k in node.keywords}
            constant = given.get(keyword)
            assert isinstance(constant, ast.Constant) and constant.value is value, (
                f"{path}:{node.lineno}: {owner.id}.{node.func.attr} without {keyword}={value}"
            )


def test_a_pickled_array_is_refused_on_the_wire() -> None:
    """The packed-batch reader (TorchServe handler input) refuses an object-dtype .npy."""
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidInputError):
        unpack(buffer.getvalue())
