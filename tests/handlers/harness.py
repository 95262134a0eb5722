"""Drive a handler the way TorchServe's worker does, with TorchServe's own Context class.

``ts.service.Service.predict`` builds one ``RequestProcessor`` per request (its headers),
puts them on the context and calls the entry point with the list of request inputs; the
replies come back as a list plus per-index status, content type and headers on the context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ts.context import Context, RequestProcessor


@dataclass(frozen=True)
class Answer:
    """One request's reply as TorchServe would send it."""

    status: int
    content_type: str | None
    headers: dict[str, str]
    body: Any


def make_context(
    model: str, model_dir: Path, artifact: str, handler_options: dict[str, Any] | None = None
) -> Context:
    """A worker's context for ``model`` serving ``model_dir/artifact`` on the CPU."""
    manifest = {"model": {"modelName": model, "serializedFile": artifact}}
    return Context(
        model,
        str(model_dir),
        manifest,
        batch_size=1,
        gpu=None,
        mms_version="0.12.0",
        model_yaml_config={"handler": handler_options or {}},
    )


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
