"""The running gateway: gRPC, HTTP and metrics servers on one event loop, over one data plane.

Shutdown (SIGTERM or Ctrl-C) drains, all within ``settings.drain_grace_s``:

1. readiness turns false at once — ``/v2/health/ready`` answers 503 — and the gRPC server
   starts its graceful stop: every gRPC connection gets an HTTP/2 GOAWAY, so a client opens
   its next calls on another replica (a load-balancing client at once; a client of this one
   address gets UNAVAILABLE from its connection attempt, retryable), and the gRPC listener
   closes (grpc.aio has no GOAWAY without it);
2. calls already accepted finish — unary calls and open ``ModelStreamInfer`` streams; a unary
   gRPC call that reaches the servicer now was accepted before the GOAWAY and is served, a
   new request on an open stream is answered UNAVAILABLE in the stream — while the HTTP
   listener stays open, so probes see 503 rather than a refused connection; every HTTP
   answer says ``Connection: close``, and new HTTP inference calls get 503;
3. when the gRPC server has no call left and the data plane is idle (or a moment before the
   grace runs out) whatever is still queued is answered UNAVAILABLE, the listeners close,
   and the process exits with status 0.

grpc core itself cancels (CANCELLED) a call it had received but not handed to the gateway
when the stop began, or one that arrives before the client read the GOAWAY: see "A drain
moves clients on" in docs/reliability.md.

With the ``tls_*`` settings the gRPC and HTTP listeners speak TLS (mutual TLS with a client
CA, :mod:`.tls`); with API keys, calls need ``authorization: Bearer <key>`` (:mod:`.auth`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from cnnserve import tracing
from cnnserve.settings import Settings

from . import processes, tls
from .auth import ApiKeys, log_auth_mode
from .dataplane import DataPlane, create_core
from .grpc_service import create_grpc_server
from .http_api import create_http_app, health_response
from .http_connections import guarded_h11_protocol
from .metrics import GatewayMetrics
from .remote_backend import create_frontend_core

logger = logging.getLogger(__name__)

#: Part of the grace kept for closing: answers already written still reach their callers.
CLOSE_SHARE = 0.1
#: ... but never more than this many seconds of it.
MAX_CLOSE_S = 1.0
#: uvicorn checks ``should_exit`` every 0.1 s; give it at least this long to close its own
#: sockets before its task is cancelled (a cancelled one leaves its listener open).
MIN_UVICORN_CLOSE_S = 0.5


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without signal handlers of its own: the gateway drains every server at once."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave signals to :func:`run_gateway`."""
        yield


def create_metrics_app(core: DataPlane) -> Starlette:
    """Prometheus text at ``/metrics`` (as Triton serves it on port 8002), and the server's
    liveness and readiness at ``/v2/health/live`` and ``/v2/health/ready`` as on the HTTP port.

    The health routes are here too because this listener is always plaintext: under mutual
    TLS a probe (a container health check, the kubelet) has no client certificate for the HTTP
    port, and would otherwise learn only that the process runs, not that its models are ready.
    """

    async def render(_: Request) -> Response:
        return Response(core.metrics.render(), media_type=GatewayMetrics.CONTENT_TYPE)

    async def live(_: Request) -> Response:
        return health_response(core.server_live(), "live")

    async def ready(_: Request) -> Response:
        return health_response(await core.server_ready(), "ready")

    return Starlette(
        routes=[
            Route("/metrics", render),
            Route("/v2/health/live", live),
            Route("/v2/health/ready", ready),
        ]
    )


def _listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket; binding here (not in uvicorn) lets port 0 report its port.

    ``reuse_port``: several gateway processes share the port (``gateway_processes``).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=1024, reuse_port=reuse_port)


@dataclass
class _HttpServer:
    server: _EmbeddedUvicorn
    task: asyncio.Task[None]
    port: int


async def _start_http(
    app: ASGIApp,
    host: str,
    port: int,
    settings: Settings,
    reuse_port: bool = False,
    **ssl_options: Any,
) -> _HttpServer:
    sock = _listen(host, port, reuse_port)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        http=guarded_h11_protocol(settings),
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, round(settings.drain_grace_s)),
        **ssl_options,
    )
    server = _EmbeddedUvicorn(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # startup failed: raise why
            raise RuntimeError(f"HTTP server on {host}:{bound} stopped during startup")
        await asyncio.sleep(0.01)
    return _HttpServer(server, task, bound)


class Gateway:
    """One data plane behind the gRPC, HTTP and metrics listeners.

    ``serve_metrics=False``: no metrics listener (another process of the same gateway serves
    every process's metrics, see :mod:`.processes`).
    """

    def __init__(self, settings: Settings, core: DataPlane, serve_metrics: bool = True) -> None:
        self.settings = settings
        self.core = core
        self._serve_metrics = serve_metrics
        self._grpc: grpc.aio.Server | None = None
        self._http: _HttpServer | None = None
        self._metrics: _HttpServer | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        """Start the core, then the listeners; ports of 0 are replaced by the bound ones.

        When any part fails to start (a port taken, a model missing) what did start is
        stopped again before the error propagates.
        """
        try:
            await self._start()
        except BaseException:
            await self.stop(0.0)
            raise

    async def _start(self) -> None:
        s = self.settings
        # Bad key or certificate files fail the start before any model loads.
        log_auth_mode(ApiKeys.from_settings(s))
        credentials = tls.grpc_server_credentials(s)
        await self.core.start()
        if self._serve_metrics:
            self._metrics = await _start_http(
                create_metrics_app(self.core), s.host, s.metrics_port, s
            )
            self.metrics_port = self._metrics.port
        self._grpc = create_grpc_server(self.core, s)
        address = f"{_grpc_host(s.host)}:{s.grpc_port}"
        # add_*_port raises when the address cannot be bound.
        if credentials is None:
            self.grpc_port = self._grpc.add_insecure_port(address)
        else:
            self.grpc_port = self._grpc.add_secure_port(address, credentials)
        await self._grpc.start()
        self._http = await _start_http(
            create_http_app(self.core, s),
            s.host,
            s.http_port,
            s,
            s.gateway_processes > 1,
            **tls.uvicorn_ssl_options(s),
        )
        self.http_port = self._http.port
        logger.info(
            "cnnserve gateway on %s: HTTP %d, gRPC %d (%s), metrics %d (%s backend)",
            s.host,
            self.http_port,
            self.grpc_port,
            tls.describe(s),
            self.metrics_port,
            s.backend,
        )

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain and close everything within ``grace_s`` (default ``drain_grace_s``); see
        the module docstring for the order."""
        grace = self.settings.drain_grace_s if grace_s is None else grace_s
        give_up_at = time.monotonic() + grace
        self.core.begin_drain()
        grpc_stopping: asyncio.Future[None] | None = None
        if self._grpc is not None:
            # grpc.aio sends GOAWAY only from a stop, which also closes the listener: started
            # now, it moves gRPC clients on while the calls they already made finish here.
            # Streams still open when the grace runs out (ModelStreamInfer, health Watch)
            # are cut.
            grpc_stopping = asyncio.ensure_future(self._grpc.stop(grace))
        logger.info(
            "draining: readiness false, gRPC clients sent GOAWAY; in-flight calls get up to %.1f s",
            grace,
        )
        until = give_up_at - min(MAX_CLOSE_S, grace * CLOSE_SHARE)
        if grpc_stopping is not None:
            # A gRPC call accepted before the GOAWAY may not have reached the core yet: the
            # core is idle for good only once the gRPC server has no call left either.
            await asyncio.wait({grpc_stopping}, timeout=max(0.0, until - time.monotonic()))
        if not await self.core.wait_idle(until - time.monotonic()):
            logger.warning("drain grace ran out: calls still in flight get UNAVAILABLE")
        await self.core.stop(0.0)
        left = max(0.0, give_up_at - time.monotonic())
        closing = [] if grpc_stopping is None else [grpc_stopping]
        for http in (self._http, self._metrics):
            if http is not None:
                http.server.should_exit = True
                closing.append(
                    asyncio.ensure_future(_finish(http.task, max(left, MIN_UVICORN_CLOSE_S)))
                )
        await asyncio.gather(*closing)
        logger.info("gateway stopped")


def _grpc_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _finish(task: asyncio.Task[None], timeout_s: float) -> None:
    """Wait for a uvicorn task; cancel it if it outlives the grace (its clients get cut)."""
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def serve_forever(settings: Settings, serve_metrics: bool = True) -> None:
    """Run :func:`run_gateway` on the event loop ``settings.event_loop`` names — in
    ``settings.gateway_processes`` processes sharing the ports when that is above 1."""
    if settings.gateway_processes > 1 and not processes.in_worker():
        processes.run_processes(settings, serve_forever)
        return
    if settings.event_loop == "uvloop":
        import uvloop

        uvloop.run(run_gateway(settings, serve_metrics))
    else:
        asyncio.run(run_gateway(settings, serve_metrics))


async def run_gateway(settings: Settings, serve_metrics: bool = True) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return (a second signal is not caught)."""
    with tracing.exporting(settings):
        await _serve_until_signalled(settings, serve_metrics)


async def _serve_until_signalled(settings: Settings, serve_metrics: bool) -> None:
    socket_path = processes.batching_socket()
    if socket_path is None:
        core = await create_core(settings)
    else:
        core = create_frontend_core(settings, socket_path)
    gateway = Gateway(settings, core, serve_metrics)
    await gateway.start()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)

    def on_signal(signum: int) -> None:
        logger.info("%s received: shutting down", signal.Signals(signum).name)
        stopping.set()
        # A second Ctrl-C now interrupts the drain the usual way.
        for sig in signals:
            loop.remove_signal_handler(sig)

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await stopping.wait()
    finally:
        await gateway.stop()
