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

from . import CheckpointError
from .spec import Architecture, ModelSpec


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
    state_dict = _state_dict_of(_read(path), spec.name, path)
    network = spec.network()
    _check_compatible(network, state_dict, path)
    network.load_state_dict(state_dict)
    return network.eval()


def load_any_class_count(architecture: Architecture, path: Path) -> nn.Module:
    """A network of ``architecture`` with as many classes as the checkpoint in ``path`` has.

    The class count is read from the output layer's shape; a checkpoint of another network is
    refused naming the first parameter (in the network's own order) that does not fit.
    """
    state_dict = _state_dict_of(_read(path), None, path)
    head = state_dict.get(architecture.head)
    num_classes = int(head.shape[0]) if head is not None and head.dim() == 1 else 1
    network = architecture.network(max(num_classes, 1))
    for name, expected in network.state_dict().items():
        got = state_dict.get(name)
        if got is None or tuple(got.shape) != tuple(expected.shape):
            found = "missing" if got is None else f"shape {list(got.shape)}"
            raise CheckpointError(
                f"{path} is not a {architecture.value} checkpoint: {name} is {found}, the "
                f"{architecture.value} needs {list(expected.shape)}"
            )
    extra = sorted(set(state_dict) - set(network.state_dict()))
    if extra:
        raise CheckpointError(
            f"{path} is not a {architecture.value} checkpoint: it also holds {extra[0]}"
        )
    network.load_state_dict(state_dict)
    return network.eval()


def _read(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line}") from None


def _state_dict_of(raw: object, model: str | None, path: Path) -> dict[str, torch.Tensor]:
    """The parameters of a cnnserve checkpoint (of ``model``, when given) or a state_dict."""
    if isinstance(raw, dict) and "state_dict" in raw:
        if model is not None and raw.get("model") not in (None, model):
            raise CheckpointError(f"{path} holds a {raw['model']!r} checkpoint, not {model!r}")
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
