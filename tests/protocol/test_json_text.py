"""Caller JSON whose shape used to raise past the codecs: deep nesting, huge integers."""

from __future__ import annotations

import json

import pytest

from cnnserve.protocol.errors import CodecError
from cnnserve.protocol.http_codec import decode_infer_request
from cnnserve.protocol.json_text import SHOWN_CHARS, load_json, shown
from cnnserve.protocol.triton_codec import index_request_from_json, repository_request_from_json

DEEP = b"[" * 100_000 + b"]" * 100_000
HUGE_INTEGER = b"1" * 4301


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (DEEP, "nested too deeply"),
        (b'{"inputs": ' + DEEP + b"}", "nested too deeply"),
        (b'{"id": ' + HUGE_INTEGER + b"}", "not valid JSON: Exceeds the limit"),
        (b'{"inputs": [], "parameters": {"timeout": ' + HUGE_INTEGER + b"}}", "Exceeds the limit"),
    ],
)
def test_bodies_json_cannot_parse_are_codec_errors(body: bytes, message: str) -> None:
    for decode in (
        lambda: decode_infer_request(body, None, "convnet", ""),
        lambda: index_request_from_json(body),
        lambda: repository_request_from_json(body, "load"),
    ):
        with pytest.raises(CodecError, match=message):
            decode()


def test_values_nested_just_under_the_parser_limit_are_named_not_dumped() -> None:
    # Parsable; quoted back with json.dumps a few frames deeper than the parser ran (as the
    # error path is), a value this deep can raise RecursionError.
    depth = 900
    body = b'{"id": ' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(CodecError, match="id must be a string, got a list of 1 elements"):
        decode_infer_request(body, None, "convnet", "")


def test_shown_is_bounded() -> None:
    assert shown("x" * 10_000) == json.dumps("x" * SHOWN_CHARS)[:-1] + '..."'
    assert shown({"a": 1, "b": 2}) == "an object of 2 members"
    assert shown(10**400) == "an integer of 1329 bits"
    assert shown(True) == "true"
    assert load_json(b"[1]", "body") == [1]
