"""The HTTP transport: Open Inference Protocol REST (``/v2/...``) and friendly image routes.

Thin by design, like the gRPC servicer: each route converts HTTP ↔ domain
(:mod:`cnnserve.protocol.http_codec`) and calls the one
:class:`~cnnserve.gateway.dataplane.DataPlane`.

- Errors: body ``{"error": "<message>"}`` with the error table's status
  (:mod:`cnnserve.protocol.status`); unknown exceptions are logged with their traceback and answered
  500 with a generic message. Malformed requests (bad JSON, a bad query parameter, an
  unsupported ``Content-Encoding``) are bad input: 400. No route rejects a request for its
  ``Content-Type`` — standard clients send none or a generic one — so there is no 415.
- Health: 200 when live/ready, 503 (the table's "not ready") when not.
- Body size: ``settings.max_message_bytes``, checked against ``Content-Length`` before
  reading and again while streaming (and after decompressing ``gzip``/``deflate``): 413.
- Pictures for people (``/predict/{model}/features``, ``/demo/scene.png``): drawn by
  :mod:`.pictures` in the data plane's decode threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cnnserve.errors import (
    CnnserveError,
    InvalidInputError,
    PayloadTooLargeError,
    public_message,
)
from cnnserve.models.repository import ModelVersion
from cnnserve.models.scenes import MIN_SCENE_SIDE
from cnnserve.models.semantics import check_image_count, parse_options, render_reply
from cnnserve.models.spec import FCN_MAX_SIDE, ModelSpec
from cnnserve.protocol.domain import InferRequest, RequestedOutput, Tensor
from cnnserve.protocol.http_codec import (
    HEADER_LENGTH,
    decode_infer_request,
    encode_infer_response,
    model_metadata_to_json,
    server_metadata_to_json,
)
from cnnserve.protocol.status import http_status
from cnnserve.protocol.triton_codec import (
    index_request_from_json,
    index_to_json,
    model_config_to_json,
    repository_request_from_json,
    statistics_to_json,
)
from cnnserve.settings import Settings

from . import repository_api
from .access_log import RequestLog
from .auth import ApiKeyMiddleware, ApiKeys
from .dataplane import DataPlane, caller_input
from .docs_page import add_docs
from .memory_budget import MemoryBudget, decode_bytes
from .openapi import LAYER_DESCRIPTION, describe_api, option_parameters
from .pictures import DRAWING_BYTES, Picture, channel_split, layer_picture, scene_png
from .security_headers import PageSecurityHeaders
from .web import web_router

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The ``version`` query parameter of the routes for people.
VersionQuery = Annotated[str, Query(description="A version number; default the highest ready.")]
#: The features route's ``layer`` that draws the input image's channels.
RGB_LAYER = "rgb"
#: Seeds of the demo scenes: any unsigned 32-bit integer.
MAX_SCENE_SEED = 2**32 - 1
#: The demo scene's side unless asked: the side the FCN was trained on.
DEMO_SCENE_SIDE = 64
#: zlib ``wbits`` for each accepted request ``Content-Encoding``.
_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def error_response(exc: BaseException) -> JSONResponse:
    """``{"error": ...}`` with the error table's status for ``exc``."""
    return JSONResponse({"error": public_message(exc)}, status_code=http_status(exc))


class ErrorTableRoute(APIRoute):
    """A route whose exceptions are answered from the error table (and logged if not ours)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """Wrap FastAPI's handler so no exception escapes as an unformatted 500."""
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (HTTPException, RequestValidationError):
                raise  # FastAPI's own, formatted by the app's handlers below
            except ClientDisconnect:
                # The caller is gone (or was too slow: see .http_connections); this answer
                # reaches no one, and there is nothing to log.
                return Response(status_code=400)
            except Exception as exc:
                if not isinstance(exc, CnnserveError):
                    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
                return error_response(exc)

        return guarded


async def while_connected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work`` unless the caller hangs up first: then it is cancelled — its items
    leave the batcher's queue unseen, as a cancelled gRPC call's do — and
    :class:`ClientDisconnect` is raised."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():  # the caller left, or this handler itself was cancelled
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnect
    return task.result()


async def _disconnected(request: Request) -> None:
    """Return when the server reports the caller gone (the body was read whole before)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) one over ``limit`` bytes before reading all of it."""
    declared = _byte_count(request.headers.get("content-length"))
    if declared is not None and declared > limit:
        raise _too_large(declared, limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    # An empty Content-Encoding lists no coding (RFC 9110 §8.4): the body is as sent.
    encoding = request.headers.get("content-encoding", "").strip().lower() or "identity"
    if encoding == "identity":
        return body
    if encoding not in _ENCODINGS:
        raise InvalidInputError(
            f"Content-Encoding {encoding!r} is not accepted; send gzip, deflate or identity"
        )
    inflater = zlib.decompressobj(_ENCODINGS[encoding])
    try:
        # max_length bounds memory: a small compressed bomb cannot expand past the limit.
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInputError(f"body is not valid {encoding} data: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise _too_large(len(data), limit, "decompressed ")
    return data


def _too_large(size: int, limit: int, what: str = "") -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"{what}request body is over the limit: {size} > {limit} bytes (max_message_bytes)"
    )


def _byte_count(value: str | None) -> int | None:
    """A header's decimal byte count; ``None`` when absent or not one. ASCII digits only
    (``str.isdigit`` also accepts ``"²"``, which ``int`` refuses), and few enough that ``int``
    converts them (it refuses more than 4,300) — more than any body could hold."""
    if value is None:
        return None
    value = value.strip()
    ok = value.isascii() and value.isdigit() and len(value) <= _MAX_COUNT_DIGITS
    return int(value) if ok else None


#: Digits of the longest byte count read from a header (10**18 bytes: an exabyte).
_MAX_COUNT_DIGITS = 18


def _header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    length = _byte_count(value)
    if value is not None and length is None:
        raise InvalidInputError(f"{HEADER_LENGTH} must be a byte count, got {value[:60]!r}")
    return length


def health_response(ok: bool, key: str, **extra: Any) -> JSONResponse:
    """A health answer as the Open Inference Protocol gives it: ``{key: ok}``, 200 or 503."""
    return JSONResponse({**extra, key: ok}, status_code=200 if ok else 503)


def _oip_router(core: DataPlane, settings: Settings) -> APIRouter:
    router = APIRouter(route_class=ErrorTableRoute, tags=["Open Inference Protocol"])

    @router.get("/v2/health/live")
    async def server_live() -> JSONResponse:
        """200 while the server can answer requests."""
        return health_response(core.server_live(), "live")

    @router.get("/v2/health/ready")
    async def server_ready() -> JSONResponse:
        """200 when every model is loaded and its backend answers; 503 otherwise."""
        return health_response(await core.server_ready(), "ready")

    @router.get("/v2")
    async def server_metadata() -> JSONResponse:
        """Server name, version and protocol extensions."""
        return JSONResponse(server_metadata_to_json(core.server_metadata()))

    @router.get("/v2/models/{model}")
    @router.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(model: str, version: str = "") -> JSONResponse:
        """A model's versions, platform, inputs and outputs (-1: variable dimension)."""
        return JSONResponse(model_metadata_to_json(core.model_metadata(model, version)))

    @router.get("/v2/models/{model}/ready")
    @router.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str = "") -> JSONResponse:
        """200 when the model is ready, 503 when not, 404 when it is not served."""
        return health_response(await core.model_ready(model, version), "ready", name=model)

    @router.post("/v2/models/{model}/infer")
    @router.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: str = "") -> Response:
        """Inference with a JSON body, or JSON + binary tensors (Triton's extension)."""
        body = await read_body(request, settings.max_message_bytes)
        decoded = await core.convert_message(
            len(body),
            decode_infer_request,
            body,
            _header_length(request),
            model,
            version,
            core.input_limits,
        )
        response = await while_connected(request, core.infer(decoded.request))
        content, header_length = await core.convert_message(
            sum(np.asarray(t.data).nbytes for t in response.outputs),
            encode_infer_response,
            response,
            decoded,
        )
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(
            content,
            media_type="application/octet-stream",
            headers={HEADER_LENGTH: str(header_length)},
        )

    return router


def _repository_router(core: DataPlane, settings: Settings) -> APIRouter:
    """Triton's model repository, model configuration and statistics extensions.

    Model names in these paths may hold ``/`` (``{model:path}``), so that a name that could
    leave the repository reaches the name check and is refused as bad input (400), not
    mistaken for another route.
    """
    router = APIRouter(route_class=ErrorTableRoute, tags=["Model repository"])

    @router.post("/v2/repository/index")
    async def repository_index(request: Request) -> JSONResponse:
        """Every model of the repository, each version with its state (READY, UNAVAILABLE,
        LOADING, UNLOADING) and the reason; body ``{"ready": true}``: READY ones only."""
        body = await read_body(request, settings.max_message_bytes)
        with caller_input():
            ready = index_request_from_json(body)
        return JSONResponse(index_to_json(repository_api.index(core, ready)))

    @router.post("/v2/repository/models/{model:path}/load")
    async def load_model(model: str, request: Request) -> JSONResponse:
        """Load (or reload) a model from its folder; answers when it serves (explicit
        model control mode only)."""
        body = await read_body(request, settings.max_message_bytes)
        with caller_input():
            parameters = repository_request_from_json(body, "load")
        await repository_api.load(core, model, parameters)
        return JSONResponse({})

    @router.post("/v2/repository/models/{model:path}/unload")
    async def unload_model(model: str, request: Request) -> JSONResponse:
        """Unload a model once its in-flight requests finished (explicit model control mode
        only); parameter ``unload_dependents`` is accepted (a model has no dependents)."""
        body = await read_body(request, settings.max_message_bytes)
        with caller_input():
            parameters = repository_request_from_json(body, "unload")
        await repository_api.unload(core, model, parameters)
        return JSONResponse({})

    # Routes match in the order they are added, and the decorator nearest the function adds
    # its route first: a versioned path before the {model:path} that would swallow it, and
    # this router before /v2/models/{model}, which would take "stats" for a model's name.
    @router.get("/v2/models/{model:path}/stats")
    @router.get("/v2/models/{model}/versions/{version}/stats")
    @router.get("/v2/models/stats")
    async def model_statistics(model: str = "", version: str = "") -> JSONResponse:
        """Counts and cumulative times (ns) of every loaded version, one model's, or one
        version's, as Triton's ``{"model_stats": [...]}``."""
        return JSONResponse(statistics_to_json(repository_api.statistics(core, model, version)))

    @router.get("/v2/models/{model:path}/config")
    @router.get("/v2/models/{model}/versions/{version}/config")
    async def model_config(model: str, version: str = "") -> JSONResponse:
        """How a model version is served, as Triton's model configuration JSON."""
        return JSONResponse(model_config_to_json(repository_api.model_config(core, model, version)))

    return router


async def _uploaded_images(request: Request, limit: int) -> list[bytes]:
    """The images of a friendly request: the raw body, or every file of a multipart form."""
    body = await read_body(request, limit)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return [body]

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_part_size=limit)
    try:
        images = [await part.read() for _, part in form.multi_items() if not isinstance(part, str)]
    finally:
        await form.close()
    if not images:
        raise InvalidInputError("the multipart form holds no file; attach PNG/JPEG images")
    return images


def _predict_router(core: DataPlane, settings: Settings) -> APIRouter:
    router = APIRouter(route_class=ErrorTableRoute, tags=["For people"])

    @router.post(
        "/predict/{model}",
        responses={200: {"content": {"application/json": {}, "image/png": {}}}},
        # The options are parsed by cnnserve.models.semantics, as TorchServe's handler parses
        # them, so the route declares them for the description only.
        openapi_extra={"parameters": option_parameters()},
    )
    async def predict(
        model: str,
        request: Request,
        version: VersionQuery = "",
    ) -> Response:
        """POST PNG/JPEG image(s) — the raw body, or files of a multipart form.

        convnet answers JSON: per image the best label and the ``top_k`` most probable, with
        probabilities; fcn answers the class mask of one image as a palette PNG (pixel value =
        class index, pixels per class in ``X-Pixel-Counts``), or with ``format=json`` the
        pixels per class of each image. TorchServe's handler answers the same bytes.
        """
        # The version whose spec shapes the reply is the one that answers.
        served = core.models.version(model, version)
        spec = served.spec
        options = parse_options(request.query_params)
        images = await _uploaded_images(request, settings.max_message_bytes)
        check_image_count(spec, options, len(images))
        data = np.empty(len(images), dtype=object)
        data[:] = images
        response = await while_connected(
            request,
            core.infer(
                InferRequest(
                    model_name=model,
                    inputs=[Tensor("image", "BYTES", (len(images),), data)],
                    outputs=[RequestedOutput(spec.output_name)],
                    model_version=str(served.version),
                )
            ),
        )
        (raw,) = response.outputs
        reply = render_reply(spec, raw.data, options)
        return Response(reply.body, media_type=reply.content_type, headers=dict(reply.headers))

    @router.post("/predict/{model}/features", response_class=Response)
    async def features(
        model: str,
        request: Request,
        layer: Annotated[str, Query(description=LAYER_DESCRIPTION)],
        version: VersionQuery = "",
    ) -> Response:
        """POST one PNG/JPEG image — the raw body, or a file of a multipart form — and get
        what the network makes of it at ``layer``, as a grey PNG grid: one tile per channel,
        each scaled to its own range (black its smallest value, white its largest; black
        throughout when constant), ``ceil(√C)`` tiles to a row, 2 white pixels apart.

        ``layer=rgb`` draws the image as the network is given it, split into its R, G and
        B channels (values as they are). ``fc1`` (the ConvNet's 512 values) is one tile of
        16×32 cells. Tiles are shrunk to 128 px at most and small maps enlarged, the grid
        kept under 2 million pixels. Headers: ``X-Layer-Shape`` (``C,H,W``, or ``512``),
        ``X-Grid-Shape`` (rows, columns), ``X-Tile-Shape`` (height, width in pixels).
        """
        served = core.models.version(model, version)
        layers = (RGB_LAYER, *served.spec.feature_layers)
        if layer not in layers:
            raise InvalidInputError(
                f"unknown layer {layer!r} for {model}; valid layers: {', '.join(layers)}"
            )
        images = await _uploaded_images(request, settings.max_message_bytes)
        if len(images) != 1:
            raise InvalidInputError(f"a picture is drawn of one image; got {len(images)}")
        if layer == RGB_LAYER:
            picture = await core.decode_pool.run(
                _draw_channels, core.memory, served.spec, images[0], settings.max_image_pixels
            )
        else:
            picture = await _layer_grid(request, served, layer, images[0])
        return Response(picture.png, media_type="image/png", headers=picture.headers())

    async def _layer_grid(
        request: Request, served: ModelVersion, layer: str, image: bytes
    ) -> Picture:
        """The maps of ``layer`` from the data plane, drawn in the decode pool; the maps are
        held, and the drawing's memory reserved, until the picture is drawn."""
        response = await while_connected(
            request,
            core.infer(
                InferRequest(
                    model_name=served.spec.name,
                    inputs=[Tensor("image", "BYTES", (1,), np.array([image], dtype=object))],
                    outputs=[RequestedOutput(layer)],
                    model_version=str(served.version),
                )
            ),
        )
        (maps,) = response.outputs
        with core.memory.reserve(maps.data.nbytes + DRAWING_BYTES, f"this picture of {layer}"):
            return await core.decode_pool.run(layer_picture, maps.data[0])

    @router.get("/demo/scene.png", response_class=Response)
    async def demo_scene(
        seed: Annotated[
            int,
            Query(
                ge=0, le=MAX_SCENE_SEED, description="Which scene: the same seed, the same scene."
            ),
        ],
        size: Annotated[
            int,
            Query(ge=MIN_SCENE_SIDE, le=FCN_MAX_SIDE, description="The scene's side in pixels."),
        ] = DEMO_SCENE_SIDE,
    ) -> Response:
        """One of the FCN's demo scenes as an RGB PNG, drawn from ``seed`` by the generator
        its training data comes from: circles, squares and triangles drawn solid, as outlines
        or striped on a grainy background — an image to try ``POST /predict/fcn`` on."""
        png = await core.decode_pool.run(scene_png, seed, size)
        return Response(png, media_type="image/png")

    return router


def _draw_channels(memory: MemoryBudget, spec: ModelSpec, image: bytes, max_pixels: int) -> Picture:
    """R, G and B tiles of ``image`` as ``spec``'s network is given it, in a decode thread
    (its header read there too: bytes Pillow must parse can take a while); the decode's and
    the drawing's memory reserved from the header before any pixel is decoded."""
    header = spec.read_image_header(image, max_pixels)
    with memory.reserve(decode_bytes(header.pixels) + DRAWING_BYTES, "this picture"):
        return channel_split(spec.image_to_pixels(image, max_pixels))


class CloseWhileDraining:
    """While the gateway drains, every answer says ``Connection: close`` (and the connection is
    closed after it): a keep-alive client opens its next connection anew — through the load
    balancer, to a replica that serves — instead of being answered 503 on this one until the
    process exits."""

    def __init__(self, app: ASGIApp, core: DataPlane) -> None:
        self.app = app
        self._core = core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Add the header to a response that starts during a drain."""

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self._core.draining:
                headers = [*message.get("headers", []), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, closing if scope["type"] == "http" else send)


def create_http_app(core: DataPlane, settings: Settings) -> FastAPI:
    """The ASGI app: OIP REST, friendly routes, and uniform ``{"error"}`` bodies; with API
    keys configured, every route but ``/v2/health/*`` and the pages needs one (:mod:`.auth`).
    ``/docs`` is served whole by the gateway (:mod:`.docs_page`), the pages with their
    security headers (:mod:`.security_headers`)."""
    app = FastAPI(
        title="cnnserve",
        summary="The tutorial's ConvNet and FCN over the Open Inference Protocol",
        version=core.server_metadata().version,
        # FastAPI's pages load their scripts from a CDN; add_docs serves /docs instead.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    keys = ApiKeys.from_settings(settings)
    if keys is not None:
        app.add_middleware(ApiKeyMiddleware, keys=keys)
    app.add_middleware(PageSecurityHeaders)
    app.add_middleware(CloseWhileDraining, core=core)
    # Outermost: a request refused by any layer above still gets its id and access record.
    app.add_middleware(RequestLog, enabled=settings.access_log)
    app.include_router(_repository_router(core, settings))
    app.include_router(_oip_router(core, settings))
    app.include_router(_predict_router(core, settings))
    app.include_router(web_router())
    add_docs(app)
    describe_api(app, core.model_names, api_keys=keys is not None)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        return JSONResponse({"error": f"invalid request: {details}"}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        # Its headers carry what the status needs, e.g. Allow on a 405 (RFC 9110 §15.5.6).
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    return app
