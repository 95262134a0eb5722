"""What one HTTP connection may hold, and for how long: uvicorn's h11 protocol with deadlines.

uvicorn times out idle keep-alive connections only: a client that trickles a request's
headers or body a byte at a time holds its connection (and the request's memory) for ever.
:func:`guarded_h11_protocol` adds, per connection:

- a header deadline (``http_header_timeout_s``) from the connection's start, or from the
  first byte of each further request on it: then 408 and the connection is closed;
- a body deadline (``http_body_timeout_s``) from the end of the headers to the end of the
  body: then 408 (if nothing was answered yet), the app sees the caller gone, and the
  connection is closed;
- a cap on open connections (``http_max_connections``): a connection past it is answered 503
  (``Connection: close``) before anything is read, and closed.

The h11 implementation is named explicitly so that installing ``httptools`` (which uvicorn's
"auto" would prefer) cannot silently drop these limits.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from cnnserve.settings import Settings


def _raw_response(status: int, reason: str, message: str) -> bytes:
    """A complete ``{"error"}`` response that closes the connection, written outside h11
    (which cannot answer a request it has not parsed)."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class _GuardedH11Protocol(H11Protocol):
    """See the module docstring; the limits are class attributes set by the factory."""

    header_timeout_s: float
    body_timeout_s: float
    max_connections: int

    _timer: asyncio.TimerHandle | None = None
    #: What the armed timer waits for: "headers", "body", or None (nothing armed).
    _phase: str | None = None
    #: The request cycle current when the timer was armed: a new one means new headers.
    _armed_for: RequestResponseCycle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Refuse a connection past the cap; otherwise start the header deadline."""
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(
                _raw_response(
                    503,
                    "Service Unavailable",
                    f"too many open connections (http_max_connections {self.max_connections}); "
                    "retry later",
                )
            )
            transport.close()
            return
        self._arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        """Nothing to time out any more."""
        self._arm(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """A first byte after an answered request starts the next request's header deadline."""
        if self._phase is None and not self._receiving_body():
            self._arm("headers")
        super().data_received(data)
        self._follow()

    def _receiving_body(self) -> bool:
        return self.cycle is not None and self.cycle.more_body

    def _follow(self) -> None:
        """After h11 parsed what came: headers in → the body deadline; body in → none (what
        it takes to answer is the app's business)."""
        if self._receiving_body():
            if self._phase != "body":
                self._arm("body")
        elif self._phase == "body" or self.cycle is not self._armed_for:
            self._arm(None)

    def _arm(self, phase: str | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = phase
        self._armed_for = self.cycle
        if phase is not None:
            timeout = self.header_timeout_s if phase == "headers" else self.body_timeout_s
            self._timer = self.loop.call_later(timeout, self._expired)

    def _expired(self) -> None:
        phase, self._timer, self._phase = self._phase, None, None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if phase == "body" and cycle is not None:
            # The app waiting for the body sees the caller gone, and answers no one.
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        limit = (
            f"headers within {self.header_timeout_s:g} s (http_header_timeout_s)"
            if phase == "headers"
            else f"body within {self.body_timeout_s:g} s (http_body_timeout_s)"
        )
        self.transport.write(
            _raw_response(408, "Request Timeout", f"the request's {limit} did not arrive")
        )
        self.transport.close()


def guarded_h11_protocol(settings: Settings) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the connection limits of ``settings``."""
    return type(
        "GuardedH11Protocol",
        (_GuardedH11Protocol,),
        {
            "header_timeout_s": settings.http_header_timeout_s,
            "body_timeout_s": settings.http_body_timeout_s,
            "max_connections": settings.http_max_connections,
        },
    )
