"""The batching process: one batcher per model version and the backend, fed by frontends.

With ``gateway_processes`` > 1 and ``shared_batcher`` on, the gateway processes are frontends
(transports, auth, validation, image headers, memory budget) and this one process owns the
backend and every model version's :class:`~.batcher.DynamicBatcher`, so the requests of all
frontends meet in the same batches. Frontends reach it through a Unix-domain socket in a
private directory (:mod:`.batching_ipc` frames; the client side is :mod:`.remote_backend`).

Calls (each frame's header ``op``; replies carry the call's ``id``):

- ``hello``: the backend's platform name;
- ``load``: load a version by name, number and fingerprint (its config and files, see
  :func:`~.model_manager.fingerprint`). Versions are shared, reference counted by name,
  number and fingerprint: the first frontend's load loads it, the others' count; a version
  whose files changed is another version, loaded beside the old one while that still serves;
- ``unload``: drop one reference; the last one stops the batcher (after what it holds) and
  unloads the version;
- ``ready``: the backend's readiness probe of a version;
- ``infer``: one request's items into the version's batcher, with the time it has left and
  the feature maps it asks for (``layers``); the reply is its rows and the model time they
  took, or its error;
- ``direct``: one batch straight to the backend (readiness probes), rows with per-item
  failures (with ``layers``: through the feature artifact);
- ``cancel``: the caller of an ``infer`` went away: its items leave the queue (no reply);
- ``broadcast``: a frontend loaded or unloaded a model through the repository API: every
  other frontend gets a ``notice`` frame (id 0) and does the same, so all serve alike.

Bounds: a frame is refused before it is read when it is over ``max_request_bytes`` (the
data plane admits no bigger request); a frontend has at most :data:`MAX_CALLS_PER_FRONTEND`
calls in flight (more are answered RESOURCE_EXHAUSTED); the batchers' queues are bounded as
in a single gateway. A frontend that goes away has its calls cancelled and its references
dropped. SIGTERM: new calls get UNAVAILABLE, calls in flight finish within
``drain_grace_s``, then every version is unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve import tracing
from cnnserve.errors import (
    CnnserveError,
    OverloadedError,
    UnavailableError,
)
from cnnserve.models.repository import ModelVersion, Repository, RepositoryError
from cnnserve.settings import Settings

from . import batching_ipc as ipc
from .backends import Backend, create_backend, version_text
from .batcher import DynamicBatcher, ModelTime
from .decode_pool import DecodePool, ImageDecoder
from .metrics import GatewayMetrics
from .model_manager import fingerprint, version_batch_fn, version_batcher, version_feature_fn

logger = logging.getLogger(__name__)

#: Calls one frontend may have in flight; each one's bytes the frontend priced already, this
#: bounds the tasks and queue entries a frontend can make here.
MAX_CALLS_PER_FRONTEND = 4096
#: A call's answer: the reply header's fields and its arrays.
Answer = tuple[ipc.Header, list[np.ndarray]]
#: Room for a header beside a request's bytes.
FRAME_SLACK_BYTES = 1 << 16


def frame_limit(settings: Settings) -> int:
    """The largest frame body either side accepts: no request the data plane admits holds
    more than ``max_request_bytes`` (its input and its output priced together)."""
    return settings.max_request_bytes + FRAME_SLACK_BYTES


def version_key(name: str, number: int, prints: Any) -> str:
    """A version's key here: its name, number and a digest of its fingerprint."""
    digest = hashlib.sha256(json.dumps(prints).encode()).hexdigest()[:16]
    return f"{name}/{number}/{digest}"


@dataclass
class _Shared:
    """A loaded version, its batcher, and how many frontend loads hold it."""

    model: ModelVersion
    batcher: DynamicBatcher
    refs: int = 0


class SharedModels:
    """The versions every frontend loaded, each once, with its batcher."""

    def __init__(self, settings: Settings, backend: Backend, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self.repository = Repository(settings.model_repository)
        self._threads = DecodePool(settings.decode_threads)
        #: Where a batch of encoded images becomes network input (the frontends send them
        #: encoded, their headers checked and priced).
        self.images = ImageDecoder(settings.decode_processes, self._threads)
        self._versions: dict[str, _Shared] = {}
        # Loads and unloads are rare; one at a time keeps the counts simple.
        self._lock = asyncio.Lock()

    def holds(self) -> dict[str, int]:
        """Every loaded version's key and how many frontend loads hold it."""
        return {key: shared.refs for key, shared in self._versions.items()}

    def get(self, key: str) -> _Shared:
        """The loaded version ``key``; UNAVAILABLE when it is not loaded (any more)."""
        shared = self._versions.get(key)
        if shared is None:
            raise UnavailableError(f"{key.rsplit('/', 1)[0]} is not loaded in the batching process")
        return shared

    async def load(self, name: str, number: int, prints: Any) -> str:
        """Hold version ``number`` of ``name`` as the frontend read it (``prints``): load it
        unless it is loaded already; its key."""
        key = version_key(name, number, prints)
        async with self._lock:
            shared = self._versions.get(key)
            if shared is None:
                model = await asyncio.to_thread(self._read, name, number, prints)
                await self.backend.load(model)
                observer = self.metrics.observer(name, str(number))
                pixels = self.settings.max_image_pixels
                batcher = version_batcher(
                    self.settings,
                    model,
                    version_batch_fn(self.backend, model, self.images, pixels),
                    observer,
                    version_feature_fn(self.backend, model, self.images, pixels),
                )
                batcher.start()
                shared = self._versions[key] = _Shared(model, batcher)
                logger.info("%s loaded for the frontends", version_text(model))
            shared.refs += 1
        return key

    def _read(self, name: str, number: int, prints: Any) -> ModelVersion:
        """The version as the repository holds it now, if that is what the frontend read."""
        try:
            model = self.repository.read(name).versions.get(number)
        except (RepositoryError, CnnserveError, OSError) as exc:
            raise UnavailableError(f"model {name}: {exc}") from exc
        # The JSON round trip turns the fingerprint's tuples into the lists the frontend sent.
        if model is None or json.loads(json.dumps(fingerprint(model))) != prints:
            raise UnavailableError(
                f"model {name} version {number} changed while it was loaded; load it again"
            )
        return model

    async def release(self, key: str, grace_s: float | None = None) -> None:
        """Drop one reference to ``key``; the last one stops its batcher (letting what it
        holds run for ``grace_s``, default ``drain_grace_s``) and unloads the version."""
        async with self._lock:
            shared = self._versions.get(key)
            if shared is None:
                return
            shared.refs -= 1
            if shared.refs > 0:
                return
            del self._versions[key]
            grace = self.settings.drain_grace_s if grace_s is None else grace_s
            await shared.batcher.stop(grace)
            await self.backend.unload(shared.model)
            name, number = shared.model.spec.name, shared.model.version
            if not any(
                s.model.spec.name == name and s.model.version == number
                for s in self._versions.values()
            ):
                self.metrics.forget(name, str(number))
            logger.info("%s unloaded", version_text(shared.model))

    async def close(self, grace_s: float) -> None:
        """Stop every batcher (what they hold runs for ``grace_s``) and unload everything."""
        async with self._lock:
            versions = list(self._versions.values())
            self._versions.clear()
            await asyncio.gather(*(s.batcher.stop(grace_s) for s in versions))
            for shared in versions:
                await self.backend.unload(shared.model)
        self.images.close()
        self._threads.close()


class _Connection:
    """One frontend: its calls in flight and the version references its loads hold."""

    def __init__(
        self,
        server: BatchingServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.held: Counter[str] = Counter()

    async def serve(self) -> None:
        """Read calls until the frontend goes away, each call in a task of its own."""
        limit = frame_limit(self.server.settings)
        try:
            while True:
                frame = await ipc.read_frame(self.reader, limit)
                self._dispatch(frame)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the frontend closed its end (it stopped, or died)
        except ipc.FrameError as exc:
            logger.error("frontend sent a bad frame, closing its connection: %s", exc)
        finally:
            for task in list(self.calls.values()):
                task.cancel()  # the batchers drop cancelled callers' items
            await asyncio.gather(*self.calls.values(), return_exceptions=True)
            for key, count in self.held.items():
                for _ in range(count):
                    await self.server.models.release(key)
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()

    def _dispatch(self, frame: ipc.Frame) -> None:
        header = frame.header
        call_id = int(header.get("id", 0))
        if header.get("op") == "cancel":
            task = self.calls.get(call_id)
            if task is not None:
                task.cancel()
            return
        if len(self.calls) >= MAX_CALLS_PER_FRONTEND:
            self.reply(
                call_id,
                {
                    "error": ipc.error_header(
                        OverloadedError(
                            f"{MAX_CALLS_PER_FRONTEND} calls of one frontend in flight; retry"
                        )
                    )
                },
            )
            return
        task = asyncio.get_running_loop().create_task(self._call(call_id, frame))
        self.calls[call_id] = task
        task.add_done_callback(lambda _: self.calls.pop(call_id, None))

    async def _call(self, call_id: int, frame: ipc.Frame) -> None:
        try:
            fields, arrays = await self._answer(frame)
        except asyncio.CancelledError:
            return  # the caller went away, or this frontend did: nobody reads an answer
        except CnnserveError as exc:
            fields, arrays = {"error": ipc.error_header(exc)}, []
        except Exception as exc:
            logger.exception("batching process: %s call failed", frame.header.get("op"))
            fields, arrays = {"error": ipc.error_header(exc)}, []
        self.reply(call_id, fields, arrays)

    def reply(
        self, call_id: int, fields: ipc.Header, arrays: list[np.ndarray] | None = None
    ) -> None:
        """Send one frame to this frontend (nothing once its connection is closing)."""
        if self.writer.is_closing():
            return
        # One writelines per frame: frames of concurrent calls never interleave.
        self.writer.writelines(ipc.encode({"id": call_id, **fields}, arrays or []))

    async def _answer(self, frame: ipc.Frame) -> Answer:
        calls: dict[object, Callable[[ipc.Header], Awaitable[Answer]]] = {
            "hello": self._hello,
            "load": self._load,
            "unload": self._unload,
            "broadcast": self._broadcast,
        }
        header = frame.header
        op = header.get("op")
        call = calls.get(op)
        if call is not None:
            return await call(header)
        models = self.server.models
        shared = models.get(str(header["key"]))
        if op == "ready":
            ready = shared.batcher.running and await models.backend.ready(shared.model)
            return {"ready": ready}, []
        if op == "infer":
            self.server.check_accepting()
            timeout_s = header.get("timeout_s")
            deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
            model_time = ModelTime()
            group = tuple(header.get("group", ()))
            layers = tuple(str(layer) for layer in header.get("layers", ()))
            # The frontend's request span: queue wait and batch spans here are its children.
            with tracing.continued(header.get("trace")):
                rows = await shared.batcher.submit(
                    frame.arrays[0], deadline, model_time, group, layers
                )
            reply = {
                "infer_s": model_time.seconds,
                "queue_s": model_time.queue_s,
                "batch_size": model_time.batch_size,
            }
            return reply, [rows]
        if op == "direct":
            layers = tuple(str(layer) for layer in header.get("layers", ()))
            backend, batch = models.backend, frame.arrays[0]
            if layers:
                return ipc.reply_rows(await backend.infer_features(shared.model, batch, layers))
            return ipc.reply_rows(await backend.infer_batch(shared.model, batch))
        raise ipc.FrameError(f"unknown call {op!r}")

    async def _hello(self, header: ipc.Header) -> Answer:
        return {"platform": self.server.models.backend.describe()}, []

    async def _load(self, header: ipc.Header) -> Answer:
        self.server.check_accepting()
        models = self.server.models
        key = await models.load(str(header["name"]), int(header["version"]), header["fingerprint"])
        self.held[key] += 1
        model = models.get(key).model
        return {
            "key": key,
            "takes_pixels": models.backend.takes_pixels(model),
            "decodes_images": models.backend.decodes_images(model),
        }, []

    async def _unload(self, header: ipc.Header) -> Answer:
        key = str(header["key"])
        if self.held[key] > 0:
            self.held[key] -= 1
            if not self.held[key]:
                del self.held[key]
            await self.server.models.release(key)
        return {}, []

    async def _broadcast(self, header: ipc.Header) -> Answer:
        notice = {"notice": str(header["action"]), "name": str(header["name"])}
        for connection in self.server.connections():
            if connection is not self:
                connection.reply(0, notice)
        return {}, []


class BatchingServer:
    """The batching process's socket server over :class:`SharedModels`."""

    def __init__(self, settings: Settings, backend: Backend, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models = SharedModels(settings, backend, metrics)
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._draining = False

    def connections(self) -> list[_Connection]:
        """The frontends connected now."""
        return list(self._connections)

    def check_accepting(self) -> None:
        """UNAVAILABLE while draining: new loads and requests go nowhere."""
        if self._draining:
            raise UnavailableError("the batching process is shutting down")

    async def start(self, socket_path: str) -> None:
        """Start the backend and listen on ``socket_path``."""
        await self.models.backend.start()
        self._server = await asyncio.start_unix_server(
            self._accept, path=socket_path, limit=1 << 20
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(self, reader, writer)
        self._connections.add(connection)
        try:
            await connection.serve()
        finally:
            self._connections.discard(connection)

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let the batchers run what they hold for ``grace_s``, close."""
        self._draining = True
        if self._server is not None:
            self._server.close()
        await self.models.close(grace_s)
        # Closing a connection ends its reader, which cancels what is left of its calls.
        for connection in list(self._connections):
            connection.writer.close()
        while self._connections:
            await asyncio.sleep(0.01)
        await self.models.backend.close()


async def run_batching(settings: Settings, socket_path: str, started: Callable[[], None]) -> None:
    """Serve frontends on ``socket_path`` until SIGTERM or SIGINT; ``started`` is called
    once the socket listens."""
    with tracing.exporting(settings):
        await _serve_frontends(settings, socket_path, started)


async def _serve_frontends(
    settings: Settings, socket_path: str, started: Callable[[], None]
) -> None:
    metrics = GatewayMetrics()
    server = BatchingServer(settings, create_backend(settings), metrics)
    await server.start(socket_path)
    logger.info("batching process listening for frontends (%s backend)", settings.backend)
    started()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(settings.drain_grace_s)
    logger.info("batching process stopped")


def serve_batching(settings: Settings, socket_path: str, started: Callable[[], None]) -> None:
    """Run :func:`run_batching` on the event loop ``settings.event_loop`` names."""
    if settings.event_loop == "uvloop":
        import uvloop

        uvloop.run(run_batching(settings, socket_path, started))
    else:
        asyncio.run(run_batching(settings, socket_path, started))


def socket_file(directory: str | Path) -> str:
    """The batching socket's path in its private directory."""
    return str(Path(directory) / "batching.sock")
