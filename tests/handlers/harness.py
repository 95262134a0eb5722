"""Drive a handler the way TorchServe's worker does: from a real archive, with TorchServe's own
Context class.

TorchServe unpacks an archive into a directory, reads its ``MAR-INF/MANIFEST.json`` and
``model-config.yaml``, imports the entry file and calls it with a ``Context`` naming the model
as it was registered. ``ts.service.Service.predict`` then builds one ``RequestProcessor`` per
request (its headers), puts them on the context and calls the entry point with the list of
request inputs; the replies come back as a list plus per-index status, content type and headers
on the context.
"""

from __future__ import annotations

import importlib.util
import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from ts.context import Context, RequestProcessor

from cnnserve.torchserve_engine.archive import MANIFEST


@dataclass(frozen=True)
class Answer:
    """One request's reply as TorchServe would send it."""

    status: int
    content_type: str | None
    headers: dict[str, str]
    body: Any


def unpack(archive: Path, model_dir: Path) -> Path:
    """Unpack ``archive`` into ``model_dir``, as TorchServe does before loading it."""
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(model_dir)
    return model_dir


def make_context(
    model_dir: Path, name: str | None = None, handler_options: dict[str, Any] | None = None
) -> Context:
    """A CPU worker's context for the archive unpacked in ``model_dir``, registered as
    ``name`` (default: the manifest's model name); ``handler_options`` replace the archive's
    ``handler:`` section of ``model-config.yaml``."""
    manifest = json.loads((model_dir / MANIFEST).read_text())
    model_yaml = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
    if handler_options is not None:
        model_yaml["handler"] = handler_options
    return Context(
        name or manifest["model"]["modelName"],
        str(model_dir),
        manifest,
        batch_size=1,
        gpu=None,
        mms_version="0.12.0",
        model_yaml_config=model_yaml,
    )


def entry_module(model_dir: Path) -> ModuleType:
    """The archive's entry file, imported afresh as TorchServe's worker imports it (each
    worker process imports it once, so each test gets its own module)."""
    spec = importlib.util.spec_from_file_location("model_handler", model_dir / "model_handler.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


Request = tuple[dict[str, Any], dict[str, str]]


def request(payload: Any, name: str = "body", headers: dict[str, str] | None = None) -> Request:
    """One TorchServe request: inputs (``name`` → payload; bytes arrive as a bytearray)."""
    value = bytearray(payload) if isinstance(payload, bytes) else payload
    return {name: value}, dict(headers or {})


#: A handler entry point: ``handle(data, context)``.
Handle = Callable[[list[dict[str, Any]], Context], list[Any] | None]


def call(handle: Handle, context: Context, requests: Sequence[Request]) -> list[Answer]:
    """One TorchServe batch through ``handle``; the answers in request order."""
    context.request_processor = [RequestProcessor(headers) for _, headers in requests]
    replies = handle([inputs for inputs, _ in requests], context)
    assert replies is not None
    assert len(replies) == len(requests)
    answers = []
    for index, body in enumerate(replies):
        status, _phrase = context.get_response_status(index)
        headers = dict(context.get_response_headers(index))
        content_type = headers.pop("content-type", None)
        answers.append(Answer(status, content_type, headers, body))
    return answers
