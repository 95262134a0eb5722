"""Hides the modules named in ``$TEST_NOT_INSTALLED`` (comma-separated top-level names) from
every Python process started with this folder on ``PYTHONPATH``, as if their distributions
were not installed: Python's path finder skips them, so importing one raises
``ModuleNotFoundError`` and ``importlib.util.find_spec`` finds nothing. Child processes
inherit the environment, so a gateway's spawned workers and subprocesses see the same.

tests/test_packaging.py runs cnnserve this way to prove each part works with its extra alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec, PathFinder
from types import ModuleType

_HIDDEN = frozenset(filter(None, os.environ.get("TEST_NOT_INSTALLED", "").split(",")))


class _PathFinderWithoutHidden(PathFinder):
    """Python's own path finder, blind to the hidden modules."""

    @classmethod
    def find_spec(
        cls,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname.partition(".")[0] in _HIDDEN:
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[sys.meta_path.index(PathFinder)] = _PathFinderWithoutHidden
