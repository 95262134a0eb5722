"""The gRPC transport: ``inference.GRPCInferenceService``, ``grpc.health.v1`` and reflection.

Thin by design: each RPC converts protobuf ↔ domain (:mod:`cnnserve.protocol.grpc_codec`) and
calls the one :class:`~cnnserve.gateway.dataplane.DataPlane`. Statuses come from the error
table (:mod:`cnnserve.protocol.status`); an exception that is not ours is logged with its
traceback and answered INTERNAL with a generic message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable
from typing import NoReturn, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from typing_extensions import override

from cnnserve.errors import CnnserveError, OverloadedError, UnknownModelError, public_message
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.protocol.grpc_codec import (
    ReceivedInferRequest,
    decode_work,
    grpc_status,
    model_metadata_to_proto,
    request_from_proto,
    response_to_proto,
    server_metadata_to_proto,
)
from cnnserve.protocol.triton_codec import (
    index_to_proto,
    model_config_to_proto,
    repository_parameters_from_proto,
    statistics_to_proto,
)
from cnnserve.settings import Settings

from . import access_log, repository_api
from .access_log import RequestLogInterceptor
from .auth import ApiKeyInterceptor, ApiKeys
from .dataplane import DataPlane
from .grpc_messages import ParsedByGateway

logger = logging.getLogger(__name__)

T = TypeVar("T")

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: Requests of one ModelStreamInfer stream read and not yet answered *and written*: being
#: computed, or answered and waiting for a client that does not read. Past it the stream is
#: not read, so HTTP/2 flow control pushes back on the client instead of answers piling up
#: in memory here.
STREAM_MAX_PENDING = 64
#: The shortest interval between a client's keepalive pings the server tolerates.
CLIENT_PING_MIN_INTERVAL_MS = 10_000
#: How often a health Watch re-reads readiness (a cached state: cheap).
HEALTH_WATCH_INTERVAL_S = 1.0
#: Health Watch streams open at once, over all connections.
HEALTH_MAX_WATCHES = 128


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's gRPC deadline as a ``time.monotonic()`` instant (``None``: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _log_unexpected(exc: BaseException, what: str) -> None:
    # Ours carry a public message; anything else is a bug whose details stay in the log.
    if not isinstance(exc, CnnserveError):
        logger.error("%s failed", what, exc_info=exc)


async def _guarded(
    context: grpc.aio.ServicerContext,
    call: Awaitable[T],
    what: str,
) -> T:
    """Await ``call``; turn any exception into the error table's status and public message."""
    try:
        return await call
    except Exception as exc:
        _log_unexpected(exc, what)
        await _abort(context, exc)


async def _abort(
    context: grpc.aio.ServicerContext,
    exc: BaseException,
) -> NoReturn:
    record = access_log.current_record()
    if record is not None:
        # The request's id as the data plane left it (an OIP id may have named it).
        context.set_trailing_metadata(((access_log.REQUEST_ID_HEADER, record.request_id),))
    await context.abort(grpc_status(exc), public_message(exc))
    raise AssertionError("context.abort returned")  # abort always raises


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over one :class:`DataPlane`."""

    def __init__(self, core: DataPlane) -> None:
        self._core = core

    @override
    async def ServerLive(
        self,
        request: pb.ServerLiveRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ServerLiveResponse:
        """Liveness."""
        return pb.ServerLiveResponse(live=self._core.server_live())

    @override
    async def ServerReady(
        self,
        request: pb.ServerReadyRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ServerReadyResponse:
        """Readiness of every model."""
        ready = await _guarded(context, self._core.server_ready(), "ServerReady")
        return pb.ServerReadyResponse(ready=ready)

    @override
    async def ModelReady(
        self,
        request: pb.ModelReadyRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ModelReadyResponse:
        """Readiness of one model; NOT_FOUND when it is not served."""
        ready = await _guarded(
            context, self._core.model_ready(request.name, request.version), "ModelReady"
        )
        return pb.ModelReadyResponse(ready=ready)

    @override
    async def ServerMetadata(
        self,
        request: pb.ServerMetadataRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ServerMetadataResponse:
        """Server name, version and extensions."""
        return server_metadata_to_proto(self._core.server_metadata())

    @override
    async def ModelMetadata(
        self,
        request: pb.ModelMetadataRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ModelMetadataResponse:
        """A model's inputs and outputs; NOT_FOUND when it is not served."""

        async def metadata() -> pb.ModelMetadataResponse:
            return model_metadata_to_proto(self._core.model_metadata(request.name, request.version))

        return await _guarded(context, metadata(), "ModelMetadata")

    @override
    async def ModelInfer(
        self,
        request: ReceivedInferRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ModelInferResponse:
        """One inference call, within the call's gRPC deadline (the message as
        :class:`~.grpc_messages.ParsedByGateway` parsed it: raw contents as views)."""
        # Reached here, the call was accepted before the drain's GOAWAY: served, not refused.
        call = self._infer(request, deadline_of(context), admitted=True)
        return await _guarded(context, call, "ModelInfer")

    @override
    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterable[ReceivedInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Answer each request of the stream as it completes (not necessarily in order).

        A failed request is answered with ``error_message`` (and its ``id`` in
        ``infer_response``) and the stream goes on; the stream's gRPC deadline bounds every
        request on it.
        """
        deadline = deadline_of(context)
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_MAX_PENDING)
        in_flight: set[asyncio.Task[None]] = set()

        async def answer(request: ReceivedInferRequest) -> None:
            with access_log.stream_request(request.message.id) as record:
                answers.put_nowait(await one_answer(request, record))

        async def one_answer(
            request: ReceivedInferRequest, record: access_log.RequestRecord
        ) -> pb.ModelStreamInferResponse:
            try:
                response = await self._infer(request, deadline)
                record.status = "OK"
                return pb.ModelStreamInferResponse(infer_response=response)
            except Exception as exc:
                _log_unexpected(exc, "ModelStreamInfer")
                record.status = grpc_status(exc).name
                return pb.ModelStreamInferResponse(
                    error_message=public_message(exc),
                    infer_response=pb.ModelInferResponse(
                        model_name=request.message.model_name,
                        model_version=request.message.model_version,
                        id=request.message.id,
                    ),
                )

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(answer(request))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                await asyncio.gather(*in_flight)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (message := await answers.get()) is not None:
                yield message
                # Written (gRPC resumes the generator once the transport took it): its slot
                # lets one more request be read.
                slots.release()
            await reader  # re-raise a failure to read the stream
        finally:
            reader.cancel()
            for task in list(in_flight):
                task.cancel()

    @override
    async def ModelConfig(
        self,
        request: pb.ModelConfigRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ModelConfigResponse:
        """How a model version is served, as Triton's model configuration."""

        async def config() -> pb.ModelConfigResponse:
            served = repository_api.model_config(self._core, request.name, request.version)
            return pb.ModelConfigResponse(config=model_config_to_proto(served))

        return await _guarded(context, config(), "ModelConfig")

    @override
    async def ModelStatistics(
        self,
        request: pb.ModelStatisticsRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ModelStatisticsResponse:
        """Statistics of every loaded version, one model's, or one version's."""

        async def stats() -> pb.ModelStatisticsResponse:
            return statistics_to_proto(
                repository_api.statistics(self._core, request.name, request.version)
            )

        return await _guarded(context, stats(), "ModelStatistics")

    @override
    async def RepositoryIndex(
        self,
        request: pb.RepositoryIndexRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.RepositoryIndexResponse:
        """Every model of the repository, each version with its state and reason."""

        async def rows() -> pb.RepositoryIndexResponse:
            return index_to_proto(
                repository_api.index(self._core, request.ready, request.repository_name)
            )

        return await _guarded(context, rows(), "RepositoryIndex")

    @override
    async def RepositoryModelLoad(
        self,
        request: pb.RepositoryModelLoadRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.RepositoryModelLoadResponse:
        """Load (or reload) a model from its folder; answers when it serves or failed."""
        call = repository_api.load(
            self._core,
            request.model_name,
            repository_parameters_from_proto(request.parameters),
            request.repository_name,
        )
        await _guarded(context, call, "RepositoryModelLoad")
        return pb.RepositoryModelLoadResponse()

    @override
    async def RepositoryModelUnload(
        self,
        request: pb.RepositoryModelUnloadRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.RepositoryModelUnloadResponse:
        """Unload a model; answers once its in-flight requests finished and it is gone."""
        call = repository_api.unload(
            self._core,
            request.model_name,
            repository_parameters_from_proto(request.parameters),
            request.repository_name,
        )
        await _guarded(context, call, "RepositoryModelUnload")
        return pb.RepositoryModelUnloadResponse()

    async def _infer(
        self, request: ReceivedInferRequest, deadline: float | None, admitted: bool = False
    ) -> pb.ModelInferResponse:
        domain_request = await self._core.convert_message(
            decode_work(request), request_from_proto, request, deadline, self._core.input_limits
        )
        return response_to_proto(await self._core.infer(domain_request, admitted))


class ReadinessHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """``grpc.health.v1.Health`` answered from the core's readiness at the time of asking
    (a cached state, :mod:`.readiness`: no call probes a model).

    Service ``""`` (and ``inference.GRPCInferenceService``) is the whole server; a model's
    name is that model. Draining turns readiness — and so every status — NOT_SERVING. At most
    :data:`HEALTH_MAX_WATCHES` Watch streams are open at once (health needs no key).
    """

    def __init__(self, core: DataPlane) -> None:
        self._core = core
        self._watches = 0

    async def _status(self, service: str) -> health_pb2.HealthCheckResponse.ServingStatus:
        if service in ("", INFERENCE_SERVICE):
            ready = await self._core.server_ready()
        else:
            try:
                ready = await self._core.model_ready(service)
            except UnknownModelError:
                return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        return (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    @override
    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext,
    ) -> health_pb2.HealthCheckResponse:
        """The status now; NOT_FOUND for a service that is not served (as the spec asks)."""
        status = await _guarded(context, self._status(request.service), "Health.Check")
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    @override
    async def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then every change, until the caller goes away;
        RESOURCE_EXHAUSTED past :data:`HEALTH_MAX_WATCHES` open Watch streams."""
        if self._watches >= HEALTH_MAX_WATCHES:
            await _abort(
                context,
                OverloadedError(
                    f"{HEALTH_MAX_WATCHES} health Watch streams are open already; "
                    "use Check, or retry later"
                ),
            )
        self._watches += 1
        try:
            last: int | None = None
            while True:
                status = await _guarded(context, self._status(request.service), "Health.Watch")
                if status != last:
                    yield health_pb2.HealthCheckResponse(status=status)
                    last = status
                await asyncio.sleep(HEALTH_WATCH_INTERVAL_S)
        finally:
            self._watches -= 1


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def create_grpc_server(core: DataPlane, settings: Settings) -> grpc.aio.Server:
    """A gRPC server with inference, health and reflection; ports are added by the caller.

    With API keys configured, every call but liveness and readiness needs one (:mod:`.auth`).
    """
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Answers are bounded by the request's memory budget, not by what a request may send
        # (six FCN items' FP32 scores are 24 MiB).
        ("grpc.max_send_message_length", settings.max_request_bytes),
        # A port already taken must fail loudly, not be shared with another process — unless
        # this gateway runs as several processes on purpose (gateway_processes).
        ("grpc.so_reuseport", int(settings.gateway_processes > 1)),
        # What one connection may hold, and for how long (each documented in settings).
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        ("grpc.keepalive_time_ms", _ms(settings.grpc_keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(settings.grpc_keepalive_timeout_s)),
        # Ping idle connections too: a half-open one with no call is closed as well.
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients' own keepalive pings: every 10 s at most, calls open or not; two pings
        # faster than that and the connection is closed (GOAWAY "too_many_pings").
        ("grpc.http2.min_recv_ping_interval_without_data_ms", CLIENT_PING_MIN_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", _ms(settings.grpc_max_connection_idle_s)),
        ("grpc.max_connection_age_ms", _ms(settings.grpc_max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", _ms(settings.grpc_max_connection_age_grace_s)),
    ]
    keys = ApiKeys.from_settings(settings)
    # Every call gets its id and access record first, a refused one too; then the key check:
    # a refused call is not received, let alone parsed.
    interceptors: list[grpc.aio.ServerInterceptor] = [RequestLogInterceptor(settings.access_log)]
    if keys is not None:
        interceptors.append(ApiKeyInterceptor(keys))
    interceptors.append(ParsedByGateway(core))
    server = grpc.aio.server(options=options, interceptors=interceptors)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        InferenceServicer(core), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(ReadinessHealth(core), server)
    reflection.enable_server_reflection(
        (INFERENCE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    return server
