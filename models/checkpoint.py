"""Loading and saving weights, safely: ``weights_only=True`` everywhere, so no pickle runs.

Two formats load: the project's own checkpoint (a dict with ``state_dict`` and metadata) and
a plain ``state_dict`` saved from the tutorial's classes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .registry import ModelSpec


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the mismatch."""


def save_checkpoint(spec: ModelSpec, model: nn.Module, path: Path, metadata: dict[str, Any]) -> str:
    """Write the project's checkpoint format and return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": spec.name,
        "labels": list(spec.labels),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "metadata": metadata,
    }
    torch.save(payload, path)
    return sha256_file(path)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_network(spec: ModelSpec, path: Path) -> nn.Module:
    """Build ``spec``'s network with the weights in ``path``, in eval mode.

    Raises :class:`CheckpointError` for a missing or unreadable file, a checkpoint of another
    model, or keys and shapes that do not match the architecture (all named).
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line}") from None
    state_dict = _state_dict_of(raw, spec, path)
    network = spec.network()
    _check_compatible(network, state_dict, path)
    network.load_state_dict(state_dict)
    return network.eval()


def _state_dict_of(raw: object, spec: ModelSpec, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(raw, dict) and "state_dict" in raw:
        if raw.get("model") not in (None, spec.name):
            raise CheckpointError(f"{path} holds a {raw['model']!r} checkpoint, not {spec.name!r}")
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path} is not a state_dict (a dict of parameter tensors)")
    return raw


def _check_compatible(network: nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        raise CheckpointError(f"{path} does not fit this architecture: {'; '.join(parts)}")
    wrong = [
        f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(shape)}"
        for k, shape in expected.items()
        if tuple(state_dict[k].shape) != shape
    ]
    if wrong:
        raise CheckpointError(f"{path} has wrong parameter shapes: {'; '.join(wrong)}")
