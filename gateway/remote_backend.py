"""A frontend's side of the shared batcher: its backend and batchers forward to the batching
process (:mod:`.batching_process`) over a Unix-domain socket.

A frontend keeps everything a gateway does at the edge — transports, auth, validation, image
headers, the memory budget, its model manager reading the repository — but runs no model:

- :class:`RemoteBackend` is its :class:`~.backends.Backend`: loads, unloads and readiness
  probes are calls to the batching process, which loads a version once for every frontend;
- :class:`RemoteBatcher` takes each version's batcher's place: a request goes on at once, as
  one call with the time it has left, into the batching process's batcher of that version,
  where it meets the other frontends' requests. Its own count of items in flight is bounded
  by the version's ``max_queue_size`` as a local queue would be; a caller that goes away
  sends a cancel, and its items leave the shared queue.

When the batching process goes away every call in flight, and every later one, is answered
UNAVAILABLE; liveness turns false, and the supervisor stops the frontends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from cnnserve import tracing
from cnnserve.errors import (
    CnnserveError,
    DeadlineExceededError,
    InvalidInputError,
    OverloadedError,
    PayloadTooLargeError,
    UnavailableError,
)
from cnnserve.models.repository import ModelVersion
from cnnserve.settings import Settings

from . import batching_ipc as ipc
from .backends import version_text
from .batcher import BatchObserver, DynamicBatcher, ModelTime, Observers, PartialResults, ShapeKey
from .batching_process import MAX_CALLS_PER_FRONTEND, frame_limit
from .dataplane import DataPlane
from .decode_pool import ImageDecoder
from .metrics import GatewayMetrics
from .model_manager import Fingerprint, ModelManager, ServedVersion, fingerprint
from .readiness import ReadinessCache

logger = logging.getLogger(__name__)

#: How long a frontend waits for the batching process's socket at start.
CONNECT_TIMEOUT_S = 30.0


class BatchingClient:
    """One connection to the batching process, many calls multiplexed on it by id."""

    def __init__(self, socket_path: str, max_body_bytes: int) -> None:
        self.socket_path = socket_path
        self.max_body_bytes = max_body_bytes
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[ipc.Frame]] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._lost = ""
        #: Called with each ``notice`` the batching process sends (another frontend's
        #: repository change).
        self.on_notice: Callable[[ipc.Header], None] | None = None

    @property
    def connected(self) -> bool:
        """Connected, and the connection has not been lost."""
        return self._writer is not None and not self._lost

    async def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect, retrying while the socket is not there yet (the batching process starts
        first, but a slow start is no failure)."""
        give_up_at = time.monotonic() + timeout_s
        while True:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    self.socket_path, limit=1 << 20
                )
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() >= give_up_at:
                    raise UnavailableError(
                        f"no batching process answers on {self.socket_path}"
                    ) from None
                await asyncio.sleep(0.05)
        self._reading = asyncio.get_running_loop().create_task(self._read_replies())

    async def close(self) -> None:
        """Close the connection; calls still in flight get UNAVAILABLE."""
        if self._writer is not None:
            self._writer.close()
        if self._reading is not None:
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)
        self._fail_all("the connection to the batching process was closed")

    async def _read_replies(self) -> None:
        assert self._reader is not None
        why = "the batching process closed the connection"
        try:
            while True:
                frame = await ipc.read_frame(self._reader, self.max_body_bytes)
                if "notice" in frame.header:
                    if self.on_notice is not None:
                        self.on_notice(frame.header)
                    continue
                future = self._pending.pop(int(frame.header.get("id", 0)), None)
                if future is not None and not future.done():
                    future.set_result(frame)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except ipc.FrameError as exc:
            why = f"the batching process sent a bad frame: {exc}"
            logger.error("%s", why)
        finally:
            self._fail_all(why)

    def _fail_all(self, why: str) -> None:
        self._lost = self._lost or why
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(UnavailableError(why))

    async def call(self, header: ipc.Header, arrays: tuple[np.ndarray, ...] = ()) -> ipc.Frame:
        """Send one call and return its reply; its error, when it failed, is raised here.

        A caller cancelled while waiting sends ``cancel`` for the call, so the batching
        process drops its items."""
        if not self.connected or self._writer is None:
            raise UnavailableError(self._lost or "not connected to the batching process")
        if len(self._pending) >= MAX_CALLS_PER_FRONTEND:
            raise OverloadedError(
                f"{MAX_CALLS_PER_FRONTEND} calls to the batching process in flight; retry later"
            )
        size = ipc.body_bytes(arrays)
        if size > self.max_body_bytes:
            raise PayloadTooLargeError(
                f"{size} bytes are more than the batching process takes in one call "
                f"({self.max_body_bytes})"
            )
        call_id = next(self._ids)
        future: asyncio.Future[ipc.Frame] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            self._writer.writelines(ipc.encode({**header, "id": call_id}, arrays))
            await self._writer.drain()
            frame = await future
        except asyncio.CancelledError:
            if self._pending.pop(call_id, None) is not None and not self._writer.is_closing():
                self._writer.writelines(ipc.encode({"op": "cancel", "id": call_id}))
            raise
        except ConnectionError as exc:
            self._pending.pop(call_id, None)
            raise UnavailableError(f"the batching process went away: {exc}") from None
        error = frame.header.get("error")
        if error is not None:
            raise ipc.raise_error(error)
        return frame


@dataclass(frozen=True)
class _RemoteVersion:
    """A version the batching process loaded for this frontend."""

    key: str
    takes_pixels: bool
    decodes_images: bool


class RemoteBackend:
    """The :class:`~.backends.Backend` of a frontend: every call goes to the batching process."""

    def __init__(self, settings: Settings, socket_path: str) -> None:
        self.client = BatchingClient(socket_path, frame_limit(settings))
        self._platform: str = settings.backend
        # Keyed by the ModelVersion object's identity, as the Backend contract asks.
        self._loaded: dict[int, tuple[ModelVersion, _RemoteVersion]] = {}

    async def start(self) -> None:
        """Connect to the batching process and learn its platform name."""
        await self.client.connect()
        hello = await self.client.call({"op": "hello"})
        self._platform = str(hello.header["platform"])

    async def close(self) -> None:
        """Release every version this frontend loaded, then close the connection."""
        for model, _ in list(self._loaded.values()):
            await self.unload(model)
        await self.client.close()

    def key(self, model: ModelVersion) -> str:
        """``model``'s key in the batching process; UNAVAILABLE when it is not loaded."""
        loaded = self._loaded.get(id(model))
        if loaded is None:
            raise UnavailableError(f"{version_text(model)} is not loaded")
        return loaded[1].key

    async def load(self, model: ModelVersion) -> None:
        """Have the batching process load ``model`` (once for all frontends)."""
        prints = await asyncio.to_thread(fingerprint, model)
        reply = await self.client.call(
            {
                "op": "load",
                "name": model.spec.name,
                "version": model.version,
                "fingerprint": prints,
            }
        )
        header = reply.header
        remote = _RemoteVersion(
            str(header["key"]), bool(header["takes_pixels"]), bool(header["decodes_images"])
        )
        self._loaded[id(model)] = (model, remote)

    async def unload(self, model: ModelVersion) -> None:
        """Drop this frontend's hold on ``model`` (the last frontend's unloads it)."""
        loaded = self._loaded.pop(id(model), None)
        if loaded is not None and self.client.connected:
            await self.client.call({"op": "unload", "key": loaded[1].key})

    async def infer_batch(self, model: ModelVersion, batch: np.ndarray) -> np.ndarray:
        """One batch straight to the backend, not through the shared batcher (readiness
        probes): its rows; an item that failed on its own fails the call."""
        return await self._direct(model, batch, ())

    async def infer_features(
        self, model: ModelVersion, batch: np.ndarray, layers: tuple[str, ...]
    ) -> np.ndarray:
        """As :meth:`infer_batch`, with ``layers``'s feature maps in the rows."""
        return await self._direct(model, batch, layers)

    async def _direct(
        self, model: ModelVersion, batch: np.ndarray, layers: tuple[str, ...]
    ) -> np.ndarray:
        header = {"op": "direct", "key": self.key(model), "layers": list(layers)}
        reply = await self.client.call(header, (batch,))
        rows = ipc.rows_of(reply)
        if isinstance(rows, PartialResults):
            index, exc = min(rows.failures.items(), key=lambda failure: failure[0])
            raise type(exc)(f"{rows.item_noun} {index}: {exc}")
        return rows

    async def ready(self, model: ModelVersion) -> bool:
        """The batching process's readiness probe of ``model``."""
        if id(model) not in self._loaded or not self.client.connected:
            return False
        try:
            reply = await self.client.call({"op": "ready", "key": self.key(model)})
        except UnavailableError:
            return False
        return bool(reply.header["ready"])

    def describe(self) -> str:
        """The batching process's backend's platform name."""
        return self._platform

    def takes_pixels(self, model: ModelVersion) -> bool:
        """What the batching process's backend said when it loaded ``model``."""
        loaded = self._loaded.get(id(model))
        return loaded is not None and loaded[1].takes_pixels

    def decodes_images(self, model: ModelVersion) -> bool:
        """What the batching process's backend said when it loaded ``model``."""
        loaded = self._loaded.get(id(model))
        return loaded is not None and loaded[1].decodes_images


async def _forms_no_batch(batch: np.ndarray) -> np.ndarray:
    raise AssertionError("a frontend's batcher forms no batch")


class RemoteBatcher(DynamicBatcher):
    """A version's batcher in a frontend: each request goes on at once to the batching
    process's batcher of that version (see the module docstring). Its queue bound and
    messages are a :class:`DynamicBatcher`'s; it forms no batch itself."""

    def __init__(
        self,
        backend: RemoteBackend,
        model: ModelVersion,
        like: DynamicBatcher,
        observer: BatchObserver,
    ) -> None:
        super().__init__(
            _forms_no_batch,
            max_batch_size=like.max_batch_size,
            max_batch_delay_ms=0,
            max_queue_size=like.max_queue_size,
            observer=observer,
            name=like.name,
        )
        self._backend = backend
        self._model = model
        self._started = False
        self._calls: set[asyncio.Task[ipc.Frame]] = set()
        self._drained: asyncio.Event | None = None
        #: A stop's grace ran out: calls still in flight were cancelled, their callers get
        #: UNAVAILABLE.
        self._abandoned = False

    @property
    def running(self) -> bool:
        """Started, not stopped, and the batching process connected."""
        return self._started and not self._closing and self._backend.client.connected

    def start(self) -> None:
        """Take requests (call inside the running loop)."""
        self._drained = asyncio.Event()
        self._drained.set()
        self._started = True

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new requests; ones in flight get ``grace_s`` (None: no limit) to finish,
        then UNAVAILABLE."""
        if not self._started or self._drained is None:
            return
        self._closing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), grace_s)
        if self._calls:
            self._abandoned = True
            for call in list(self._calls):
                call.cancel()
        self._started = False

    async def submit(
        self,
        items: np.ndarray,
        deadline: float | None = None,
        model_time: ModelTime | None = None,
        key: ShapeKey = (),
        layers: tuple[str, ...] = (),
    ) -> np.ndarray:
        """Send ``items`` (and the ``key`` and feature maps they batch under) to the shared
        batcher with the time left before ``deadline``; the rows, or the error they met
        there."""
        if not self.running or self._drained is None:
            raise UnavailableError(f"{self.name} is not accepting requests")
        count = len(items)
        if count == 0:
            raise InvalidInputError("request has no items (N = 0)")
        timeout_s = None if deadline is None else deadline - time.monotonic()
        if timeout_s is not None and timeout_s <= 0:
            self._observer.request_expired()
            raise DeadlineExceededError("deadline passed before the request was queued")
        self.check_room(count)
        header: ipc.Header = {
            "op": "infer",
            "key": self._backend.key(self._model),
            "group": list(key),
            "layers": list(layers),
            "timeout_s": timeout_s,
        }
        trace = tracing.propagation_metadata()
        if trace:
            header["trace"] = dict(trace)
        call = asyncio.ensure_future(self._backend.client.call(header, (items,)))
        self._queued += count
        self._calls.add(call)
        self._drained.clear()
        try:
            # Cancelling the caller cancels the call (the batching process drops its items).
            reply = await call
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if self._abandoned and caller is not None and not caller.cancelling():
                raise UnavailableError(f"{self.name} shut down before answering") from None
            raise
        finally:
            if not call.done():
                call.cancel()
            self._queued -= count
            self._calls.discard(call)
            if not self._calls:
                self._drained.set()
        if model_time is not None:
            model_time.seconds = float(reply.header.get("infer_s", 0.0))
            model_time.queue_s = float(reply.header.get("queue_s", 0.0))
            model_time.batch_size = int(reply.header.get("batch_size", 0))
        return reply.arrays[0]


class FrontendModelManager(ModelManager):
    """A frontend's model manager: versions load in the batching process and each one's
    batcher is a :class:`RemoteBatcher` feeding the shared one. A model loaded or unloaded
    through the repository API (explicit mode) is loaded or unloaded by every other frontend
    too, moments later: the batching process passes the change on."""

    def __init__(
        self,
        settings: Settings,
        backend: RemoteBackend,
        metrics: GatewayMetrics,
        images: ImageDecoder,
    ) -> None:
        super().__init__(settings, backend, metrics, images)
        self._remote = backend
        self._following: set[asyncio.Task[None]] = set()
        backend.client.on_notice = self._on_notice

    async def load(self, name: str) -> None:
        """Load ``name`` here (see :meth:`ModelManager.load`), then in the other frontends."""
        await super().load(name)
        await self._broadcast("load", name)

    async def unload(self, name: str) -> None:
        """Unload ``name`` here (see :meth:`ModelManager.unload`), then in the other
        frontends."""
        await super().unload(name)
        await self._broadcast("unload", name)

    async def _broadcast(self, action: str, name: str) -> None:
        with contextlib.suppress(UnavailableError):  # the batching process is gone anyway
            await self._remote.client.call({"op": "broadcast", "action": action, "name": name})

    def _on_notice(self, notice: ipc.Header) -> None:
        action, name = notice.get("notice"), str(notice.get("name"))
        change = ModelManager.load if action == "load" else ModelManager.unload
        task = asyncio.get_running_loop().create_task(self._follow(change, action, name))
        self._following.add(task)
        task.add_done_callback(self._following.discard)

    async def _follow(
        self,
        change: Callable[[ModelManager, str], Awaitable[None]],
        action: object,
        name: str,
    ) -> None:
        """Do what another frontend did (without passing it on again)."""
        try:
            await change(self, name)
        except CnnserveError as exc:
            logger.warning("following another frontend's %s of %s: %s", action, name, exc)
        else:
            logger.info("followed another frontend's %s of %s", action, name)

    async def stop(self, grace_s: float) -> None:
        """Stop following other frontends' changes, then stop as a model manager does."""
        self._remote.client.on_notice = None
        for task in list(self._following):
            task.cancel()
        await asyncio.gather(*self._following, return_exceptions=True)
        await super().stop(grace_s)

    async def _start_version(
        self, version: ModelVersion, prints: Fingerprint
    ) -> ServedVersion | str:
        served = await super()._start_version(version, prints)
        if isinstance(served, ServedVersion):
            local = served.batcher
            # Expirations before a request leaves this frontend count here; batch sizes,
            # queue depth and queue time come from the batching process.
            observer = Observers(self.metrics.observer(served.name, served.version), served.stats)
            served.batcher = RemoteBatcher(self._remote, version, local, observer)
            served.batcher.start()
            await local.stop(0.0)  # never held a request
        return served


class FrontendDataPlane(DataPlane):
    """A frontend's data plane: a gateway's, over :class:`FrontendModelManager`."""

    def __init__(
        self, settings: Settings, backend: RemoteBackend, metrics: GatewayMetrics | None = None
    ) -> None:
        super().__init__(settings, backend, metrics)
        self.models = FrontendModelManager(settings, backend, self.metrics, self.images)
        self.readiness = ReadinessCache(backend, self.models.served_versions)


def create_frontend_core(settings: Settings, socket_path: str) -> DataPlane:
    """A frontend's data plane, fed through the batching process on ``socket_path``."""
    return FrontendDataPlane(settings, RemoteBackend(settings, socket_path))
