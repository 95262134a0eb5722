"""A load generator for the Open Inference Protocol over gRPC, and for plain HTTP/1.1.

Several client processes (so the client is not the bottleneck on a small machine) each run
an asyncio loop that sends one pre-serialized request over and over:

* closed loop — ``concurrency`` requests in flight at all times;
* open loop — requests sent at ``rate_rps`` on a fixed schedule, latency measured from the
  scheduled send time so a stalled server cannot hide its queueing (no coordinated omission).

Requests and responses travel as bytes (no protobuf parsing per call); one response is parsed
up front to prove the request is valid. The HTTP transport (closed loop only) keeps one
keep-alive connection per concurrent stream and sends a complete pre-built request — how
TorchServe's own REST API is measured as a baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal

import grpc
import numpy as np

from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol.tensor_codec import encode_raw

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
#: Outstanding requests one open-loop process allows before it counts a send as dropped.
OPEN_LOOP_MAX_OUTSTANDING = 4096


@dataclass(frozen=True)
class LoadSpec:
    """One load scenario against one gRPC target."""

    target: str
    request: bytes
    items_per_request: int
    duration_s: float = 10.0
    warmup_s: float = 2.0
    concurrency: int = 1
    rate_rps: float | None = None
    processes: int = 2
    timeout_s: float = 30.0
    #: ``grpc``: ``request`` is a serialized ModelInferRequest; ``http``: a whole HTTP/1.1
    #: request (see :func:`http_request`), closed loop only.
    transport: Literal["grpc", "http"] = "grpc"
    #: gRPC connections per client process, streams spread over them; more than one lets a
    #: server of several processes sharing the port (SO_REUSEPORT) see every process loaded.
    channels: int = 1


@dataclass
class LoadResult:
    """What a scenario measured (latencies in milliseconds)."""

    requests: int
    succeeded: int
    errors: dict[str, int]
    seconds: float
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def infer_request(
    model: str,
    items: np.ndarray,
    input_name: str = "input",
    outputs: tuple[str, ...] = (),
) -> bytes:
    """A serialized ``ModelInferRequest`` carrying ``items`` as raw contents (an object array
    of ``bytes`` travels as BYTES)."""
    datatype = {
        np.dtype(np.float32): "FP32",
        np.dtype(np.uint8): "UINT8",
        np.dtype(object): "BYTES",
    }[items.dtype]
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add()
    tensor.name = input_name
    tensor.datatype = datatype
    tensor.shape.extend(items.shape)
    request.raw_input_contents.append(encode_raw(datatype, items))
    for name in outputs:
        request.outputs.add().name = name
    return request.SerializeToString()


def check_request(target: str, request: bytes, timeout_s: float = 60.0) -> pb.ModelInferResponse:
    """Send ``request`` once and parse the answer; raises grpc.RpcError if it fails."""
    with grpc.insecure_channel(target, options=_channel_options()) as channel:
        call = channel.unary_unary(MODEL_INFER)
        return pb.ModelInferResponse.FromString(call(request, timeout=timeout_s))


def http_request(
    host: str, path: str, body: bytes, headers: Mapping[str, str] | None = None
) -> bytes:
    """A complete keep-alive HTTP/1.1 POST of ``body`` to ``path``, ready to send as is."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def check_http_request(target: str, request: bytes, timeout_s: float = 60.0) -> tuple[int, bytes]:
    """Send a pre-built HTTP request once; returns the status code and the body."""

    async def once() -> tuple[int, bytes]:
        connection = HttpConnection(target, request, timeout_s)
        try:
            return await connection.exchange()
        finally:
            await connection.close()

    return asyncio.run(once())


class CallFailedError(Exception):
    """A call did not succeed; ``status`` is the gRPC code name or ``HTTP_<code>``."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class HttpConnection:
    """One keep-alive HTTP/1.1 connection sending the same request again and again."""

    def __init__(self, target: str, request: bytes, timeout_s: float) -> None:
        host, _, port = target.rpartition(":")
        self._host, self._port = host.strip("[]"), int(port)
        self._request = request
        self._timeout_s = timeout_s
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def send(self) -> None:
        """One request/response; raises :class:`CallFailedError` unless the status is 200."""
        try:
            status, _ = await asyncio.wait_for(self.exchange(), self._timeout_s)
        except TimeoutError:
            await self.close()
            raise CallFailedError("DEADLINE_EXCEEDED") from None
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await self.close()
            raise CallFailedError("CONNECTION_ERROR") from None
        if status != 200:
            raise CallFailedError(f"HTTP_{status}")

    async def exchange(self) -> tuple[int, bytes]:
        """Send the request (connecting first if needed) and read the whole response."""
        if self._streams is None:
            self._streams = await asyncio.open_connection(self._host, self._port)
        reader, writer = self._streams
        writer.write(self._request)
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in header_lines if line)
        }
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await _read_chunked(reader)
        else:
            raise ValueError("response has neither Content-Length nor chunked encoding")
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, body

    async def close(self) -> None:
        """Close the connection (the next call reconnects)."""
        if self._streams is not None:
            _, writer = self._streams
            self._streams = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers are expected
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def _channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", 256 << 20),
        ("grpc.max_receive_message_length", 256 << 20),
    ]


def run_load(spec: LoadSpec) -> LoadResult:
    """Run ``spec`` across ``spec.processes`` client processes and aggregate their figures."""
    if spec.transport == "http" and spec.rate_rps is not None:
        raise ValueError("the HTTP transport runs closed loops only")
    context = multiprocessing.get_context("spawn")  # grpc is not fork-safe
    start_at = time.time() + 1.5  # let every process connect before the clock starts
    pipes: list[Connection] = []
    workers = []
    for index in range(spec.processes):
        receiver, sender = context.Pipe(duplex=False)
        share = _share(spec, index)
        worker = context.Process(
            target=_worker_main, args=(spec, share, start_at, sender), daemon=True
        )
        worker.start()
        pipes.append(receiver)
        workers.append(worker)
    parts = [pipe.recv() for pipe in pipes]
    for worker in workers:
        worker.join(timeout=10)
    latencies = np.concatenate([p["latencies"] for p in parts]) if parts else np.zeros(0)
    errors: Counter[str] = Counter()
    for part in parts:
        errors.update(part["errors"])
    succeeded = int(sum(p["succeeded"] for p in parts))
    requests = succeeded + sum(errors.values())
    seconds = spec.duration_s
    p50, p90, p99 = (
        float(np.percentile(latencies, q)) if latencies.size else float("nan") for q in (50, 90, 99)
    )
    failed_after = {
        status: np.concatenate(
            [p["failed_after"][status] for p in parts if status in p["failed_after"]]
        )
        for status in errors
        if status != "CLIENT_DROPPED"
    }
    return LoadResult(
        requests=requests,
        succeeded=succeeded,
        errors=dict(errors),
        seconds=seconds,
        requests_per_s=succeeded / seconds,
        images_per_s=succeeded * spec.items_per_request / seconds,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        extra={
            # Latency of failed calls by status: p50 and p99 in ms.
            "failed_ms": {
                status: [float(np.percentile(ms, q)) for q in (50, 99)]
                for status, ms in failed_after.items()
                if ms.size
            }
        },
    )


@dataclass(frozen=True)
class _Share:
    concurrency: int
    rate_rps: float | None


def _share(spec: LoadSpec, index: int) -> _Share:
    """Split concurrency (or rate) evenly; the first processes take the remainder."""
    if spec.rate_rps is not None:
        return _Share(0, spec.rate_rps / spec.processes)
    base, extra = divmod(spec.concurrency, spec.processes)
    return _Share(base + (1 if index < extra else 0), None)


def _worker_main(spec: LoadSpec, share: _Share, start_at: float, pipe: Connection) -> None:
    result = asyncio.run(_worker(spec, share, start_at))
    pipe.send(result)
    pipe.close()


Sender = Callable[[], Awaitable[None]]


async def _worker(spec: LoadSpec, share: _Share, start_at: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    failed_after: defaultdict[str, list[float]] = defaultdict(list)
    async with contextlib.AsyncExitStack() as stack:
        new_sender = await _senders(spec, stack)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        clock_start = time.perf_counter()
        measure_from = clock_start + spec.warmup_s
        stop_at = measure_from + spec.duration_s

        async def one(send: Sender, sent_at: float) -> None:
            try:
                await send()
            except CallFailedError as exc:
                if sent_at >= measure_from:
                    errors[exc.status] += 1
                    # How fast a refusal comes matters too (an overloaded server must say no
                    # at once, not after a queue's worth of waiting).
                    failed_after[exc.status].append((time.perf_counter() - sent_at) * 1000.0)
                return
            done = time.perf_counter()
            if measure_from <= sent_at < stop_at:
                latencies.append((done - sent_at) * 1000.0)

        if share.rate_rps is None:

            async def closed_loop() -> None:
                send = new_sender()
                while (now := time.perf_counter()) < stop_at:
                    await one(send, now)

            await asyncio.gather(*(closed_loop() for _ in range(share.concurrency)))
        elif share.rate_rps > 0:
            send = new_sender()
            interval = 1.0 / share.rate_rps
            pending: set[asyncio.Task[None]] = set()
            next_send = clock_start
            while next_send < stop_at:
                await asyncio.sleep(max(0.0, next_send - time.perf_counter()))
                if len(pending) >= OPEN_LOOP_MAX_OUTSTANDING:
                    if next_send >= measure_from:
                        errors["CLIENT_DROPPED"] += 1
                else:
                    task = asyncio.create_task(one(send, next_send))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                next_send += interval
            if pending:
                await asyncio.gather(*pending)
    return {
        "latencies": np.asarray(latencies, dtype=np.float64),
        "errors": dict(errors),
        "failed_after": {status: np.asarray(ms) for status, ms in failed_after.items()},
        "succeeded": len(latencies),
    }


async def _senders(spec: LoadSpec, stack: contextlib.AsyncExitStack) -> Callable[[], Sender]:
    """A factory of senders, one per stream: gRPC streams share ``spec.channels`` channels
    round robin (HTTP/2 multiplexes them); HTTP/1.1 streams each need their own connection."""
    if spec.transport == "http":
        connections: list[HttpConnection] = []

        async def close_all() -> None:
            for connection in connections:
                await connection.close()

        stack.push_async_callback(close_all)

        def http_sender() -> Sender:
            connections.append(HttpConnection(spec.target, spec.request, spec.timeout_s))
            return connections[-1].send

        return http_sender
    calls = []
    for index in range(spec.channels):
        # A distinct channel argument keeps gRPC from sharing one connection between them.
        options = [*_channel_options(), ("cnnserve.bench.connection", index)]
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(spec.target, options=options)
        )
        calls.append(channel.unary_unary(MODEL_INFER))

    def grpc_sender(call: grpc.aio.UnaryUnaryMultiCallable) -> Sender:
        async def grpc_send() -> None:
            try:
                await call(spec.request, timeout=spec.timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise CallFailedError(exc.code().name) from None

        return grpc_send

    senders = itertools.cycle([grpc_sender(call) for call in calls])
    return lambda: next(senders)
