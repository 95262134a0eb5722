"""JSON from a caller, read and quoted without letting its shape raise anything but
:class:`~cnnserve.protocol.errors.CodecError`.

``json.loads`` raises more than ``JSONDecodeError``: a document nested past Python's
recursion limit raises ``RecursionError``, and an integer of more than
``sys.get_int_max_str_digits()`` digits (4,300 by default) raises a plain ``ValueError``.
Quoting a value back in an error message has the same traps (``json.dumps`` of a deeply nested
list from a deep stack) and costs as much as the value is long; :func:`shown` quotes only a
bounded prefix of a string and describes containers by kind and size.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import CodecError

#: Characters of a caller's value quoted in an error message.
SHOWN_CHARS = 60


def load_json(data: bytes | str, what: str) -> Any:
    """``data`` parsed as JSON; anything unparsable is a :class:`CodecError` naming ``what``."""
    try:
        return json.loads(data)
    except RecursionError:
        raise CodecError(f"{what} is not accepted: JSON nested too deeply") from None
    # JSONDecodeError and UnicodeDecodeError are ValueErrors, as is an over-long integer.
    except ValueError as exc:
        raise CodecError(f"{what} is not valid JSON: {exc}") from None


def shown(value: object) -> str:
    """A short JSON-like rendering of ``value`` for an error message, in bounded time."""
    if isinstance(value, dict) and value:
        return f"an object of {len(value)} members"
    if isinstance(value, list) and value:
        return f"a list of {len(value)} elements"
    if isinstance(value, str):
        text = json.dumps(value[:SHOWN_CHARS])
        return text if len(value) <= SHOWN_CHARS else text[:-1] + '..."'
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return json.dumps(value)[:SHOWN_CHARS]
