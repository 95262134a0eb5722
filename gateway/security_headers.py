"""What a browser is told about the pages (:func:`.auth.is_page`: the web page at ``/`` and its
files under ``/ui/``, ``/docs`` and its files, ``/openapi.json``): a Content-Security-Policy and
``X-Content-Type-Options: nosniff`` on every answer there.

The policy lets a page run scripts, apply style sheets and connect only to the gateway that
served it: no inline script, no ``eval``, nothing from another host — so text that reaches a
page (a model name, an error message) can never run as script there, and a page cannot be made
to send what it reads elsewhere. Images may also be ``data:`` and ``blob:`` URLs: the web page
shows the pictures it fetched as blobs, and Swagger UI's style sheet draws its icons as
``data:`` images. No plugin (``object-src``), no ``<base>`` that would move the page's relative
URLs, and no framing by other sites (clickjacking). ``nosniff`` makes a browser take each file
for the ``Content-Type`` it is served with.

The API's own answers (JSON, PNG masks, tensors) go without these headers: no browser renders
them as pages, and the hot path stays one path comparison longer, no more.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import is_page

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
)


class PageSecurityHeaders:
    """ASGI middleware adding :data:`PAGE_HEADERS` to every answer on a page's path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass everything else through untouched."""
        if scope["type"] != "http" or not is_page(scope["path"]):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *PAGE_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)
