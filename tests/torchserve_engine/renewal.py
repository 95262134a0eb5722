"""What the key-renewal tests share: a short key lifetime, and callers that keep calling.

TorchServe takes ``token_expiration_min`` as a fraction of minutes, so keys can expire within
seconds; at the default ``torchserve_token_renew_fraction`` (0.25) a 9 s key is renewed once
less than 2.25 s of it is left, every ~7 s, which the renewers' one-second checks reach well
in time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

#: ``torchserve_token_expiration_min`` of the renewal tests: 9 s.
SHORT_EXPIRATION_MIN = 0.15
#: Renewals each "keeps serving" test waits through.
RENEWALS = 3
#: Concurrent callers of the load.
CALLERS = 4
#: The most one renewal-load test may run: RENEWALS keys of 9 s, renewed at 3/4, and slack.
LOAD_TIMEOUT_S = 60.0


@dataclass
class Load:
    """What :func:`keep_calling` saw: calls answered, and every failure."""

    answered: int = 0
    failures: list[BaseException] = field(default_factory=list)


async def keep_calling(
    call: Callable[[], Awaitable[object]], until: Callable[[], bool], timeout_s: float
) -> Load:
    """:data:`CALLERS` callers make ``call`` back to back until ``until()`` holds (checked
    between calls) or ``timeout_s`` passes; every answer and failure counted."""
    load = Load()
    deadline = time.monotonic() + timeout_s

    async def caller() -> None:
        while not until() and time.monotonic() < deadline:
            try:
                await call()
            except Exception as exc:
                load.failures.append(exc)
            else:
                load.answered += 1

    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return load
