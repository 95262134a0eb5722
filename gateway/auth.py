"""Optional API-key authentication for both transports: ``authorization: Bearer <key>``.

Keys come from ``settings.api_key`` and ``settings.api_keys_file``; with neither set the
gateway is open. Health (gRPC ``ServerLive``/``ServerReady`` and ``grpc.health.v1``, HTTP
``/v2/health/*``) stays open so probes need no secret, and the metrics port has no inference
API to protect. So do the pages a browser loads (:data:`PAGE_PATHS`, :data:`PAGE_PREFIXES`:
the web page, ``/docs`` and the OpenAPI document): they hold no data and run no inference —
every call they make to a model still needs the key. A refused call gets UNAUTHENTICATED /
401 from the error table.

Keys are compared with :func:`hmac.compare_digest` against every accepted key, so the time a
check takes tells an attacker nothing about how much of a guess was right. No key — accepted
or presented — is ever logged or put into an error message.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from starlette.types import ASGIApp, Receive, Scope, Send

from cnnserve.errors import UnauthenticatedError
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol.grpc_codec import grpc_status
from cnnserve.protocol.status import ERROR_TABLE
from cnnserve.settings import Settings

logger = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
SCHEME = "bearer"
_INFERENCE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: gRPC methods answered without a key: liveness and readiness, as probes ask them.
OPEN_GRPC_METHODS = frozenset(
    {
        f"/{_INFERENCE}/ServerLive",
        f"/{_INFERENCE}/ServerReady",
        f"/{_HEALTH}/Check",
        f"/{_HEALTH}/Watch",
    }
)
#: What a browser loads to show the web page and the API's documentation: static files and
#: the OpenAPI document. Only such routes may be put under these paths and prefixes.
PAGE_PATHS = frozenset({"/", "/docs", "/openapi.json"})
PAGE_PREFIXES = ("/ui/", "/docs/")
#: HTTP paths answered without a key, besides the pages: health, for probes.
HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def is_page(path: str) -> bool:
    """Whether ``path`` is one of the pages (or their files) a browser loads."""
    return path in PAGE_PATHS or path.startswith(PAGE_PREFIXES)


def is_open_http_path(path: str) -> bool:
    """Whether ``path`` is answered without a key: health and the pages."""
    return path in HEALTH_PATHS or is_page(path)


MISSING_KEY = "missing API key: send the header `authorization: Bearer <key>`"
WRONG_KEY = "API key not accepted: check the key sent as `authorization: Bearer <key>`"


def read_keys_file(path: Path) -> list[str]:
    """The keys in ``path``, one per line; blank lines and ``#`` comments skipped."""
    keys = []
    for line in path.read_text().splitlines():
        key = line.strip()
        if key and not key.startswith("#"):
            keys.append(key)
    return keys


class ApiKeys:
    """The accepted keys and the one check both transports make."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(k.encode() for k in keys)
        if any(not k for k in self._keys):
            raise ValueError("an API key must not be empty")

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys | None:
        """The keys ``settings`` configure, or ``None`` when authentication is off."""
        keys = [] if settings.api_key is None else [settings.api_key.get_secret_value()]
        if settings.api_keys_file is not None:
            from_file = read_keys_file(settings.api_keys_file)
            if not from_file:
                raise ValueError(f"api_keys_file {settings.api_keys_file} holds no key")
            keys += from_file
        return cls(keys) if keys else None

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._keys)} keys)"  # never the keys themselves

    def check(self, authorization: str | None) -> None:
        """Accept ``Bearer <key>`` with an accepted key; raise :class:`UnauthenticatedError`."""
        if not authorization:
            raise UnauthenticatedError(MISSING_KEY)
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != SCHEME or not presented.strip():
            raise UnauthenticatedError(MISSING_KEY)
        candidate = presented.strip().encode()
        # Compare with every key (no early exit): the timing says nothing about which matched.
        matches = [hmac.compare_digest(candidate, key) for key in self._keys]
        if not any(matches):
            raise UnauthenticatedError(WRONG_KEY)


#: ``(request_streaming, response_streaming)`` → the factory of that kind of handler.
_HANDLER_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _refusal(handler: grpc.RpcMethodHandler, exc: UnauthenticatedError) -> grpc.RpcMethodHandler:
    """A handler that only aborts with ``exc``'s status, before receiving any message.

    It is request-streaming whatever the method is: gRPC receives (and parses) a unary
    request's message before calling its handler, up to the message size limit, while a
    request-streaming handler reads only what it asks for — nothing here. The wire is the
    same either way, so the caller sees the method's usual kind of call end UNAUTHENTICATED.
    """

    async def abort(_requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc_status(exc), str(exc))

    make = _HANDLER_FACTORIES[(True, handler.response_streaming)]
    return make(abort, request_deserializer=None, response_serializer=handler.response_serializer)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses gRPC calls without an accepted key, except :data:`OPEN_GRPC_METHODS`."""

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass the call on when it is open or carries an accepted key."""
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in OPEN_GRPC_METHODS:
            return handler  # unknown methods keep gRPC's own UNIMPLEMENTED
        metadata = dict(handler_call_details.invocation_metadata or ())
        try:
            self._keys.check(metadata.get(AUTHORIZATION))
        except UnauthenticatedError as exc:
            return _refusal(handler, exc)
        return handler


class ApiKeyMiddleware:
    """ASGI middleware refusing HTTP requests without an accepted key (401, ``{"error"}``),
    except on :func:`is_open_http_path`'s paths."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self._keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the ``authorization`` header, then hand the request to the app."""
        if scope["type"] != "http" or is_open_http_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == AUTHORIZATION.encode()),
            None,
        )
        try:
            self._keys.check(header)
        except UnauthenticatedError as exc:
            await _send_401(send, str(exc))
            return
        await self.app(scope, receive, send)


async def _send_401(send: Send, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": ERROR_TABLE[UnauthenticatedError.status].http_status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # RFC 6750: tell the client which scheme to use.
                (b"www-authenticate", b'Bearer realm="cnnserve"'),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def log_auth_mode(keys: ApiKeys | None) -> None:
    """One start-up line saying whether keys are required (how many, never which)."""
    if keys is None:
        logger.info("API-key authentication off: any caller may infer")
    else:
        logger.info(
            "API-key authentication on: %d accepted key(s); health and the pages stay open",
            len(keys),
        )
