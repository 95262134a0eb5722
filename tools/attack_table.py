"""Each attack of the hardening work against a real gateway at its default settings: what the
attacker got, and what it cost the gateway and its other callers.

Each attack gets a gateway process of its own, warmed up with one digit and one small scene.
For every attack it records the answer, the gateway's peak RSS growth (VmHWM, restarted when
the attack begins), its CPU seconds, the slowest ``GET /v2/health/live`` a bystander polling
every 10 ms saw meanwhile (the event loop's longest stall plus one round trip), and whether
the bystander's own inferences (a digit every 0.25 s) still succeeded within a second. The
data-plane attacks run against ``cnnserve serve --backend onnxruntime``; the health checks
against ``--backend torchserve`` in front of the stand-in TorchServe
(tests/gateway/null_torchserve.py), whose calls are counted so that readiness probes show;
the unauthenticated call and the keyed slow body against an onnxruntime gateway with an API
key. Output: a Markdown table and a JSON file under ``build/attack-table/`` named by
``--label``, and, once both a ``before`` and an ``after`` run are there, ``table.md`` with
both.

Run it in a memory cgroup (an older gateway may die of an attack; a death with the cgroup's
OOM counter grown is reported as OOM-killed at its cap)::

    .venv/bin/python tools/attack_table.py --label after
    git worktree add /tmp/before a980b46     # the last commit before the hardening work
    mkdir -p /tmp/beforepkg && cp -r /tmp/before/src/cnnserve /tmp/beforepkg/
    for d in models export handlers training gateway torchserve_engine protocol client bench
    do cp -r /tmp/before/$d /tmp/beforepkg/cnnserve/; done
    PYTHONPATH=/tmp/beforepkg .venv/bin/python tools/attack_table.py --label before

Older code is given no setting the hardening added (each gateway gets its defaults, ports,
repository and, where needed, a key or the stand-in's address); where it has no deadline of
its own, the wait for it to close a slow connection ends at ``--hold-cap-s`` ("still open").
Gateways are started by this checkout's launcher whatever package is on the path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' helpers and stand-in, the other probes


def _this_checkouts_launcher() -> None:
    """Start gateways with this checkout's launcher (bench/gateway_process.py) even when an
    older tree's package is first on the path, since tests/support.py calls it with arguments
    older launchers lack; the gateway itself still runs the package on the path."""
    import cnnserve.bench

    name = "cnnserve.bench.gateway_process"
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "gateway_process.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    cnnserve.bench.gateway_process = module


_this_checkouts_launcher()

from cnnserve.bench.gateway_process import demo_repository  # noqa: E402
from cnnserve.protocol import open_inference_pb2 as pb  # noqa: E402
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc  # noqa: E402
from cnnserve.settings import Settings  # noqa: E402
from tests.gateway.harness import metric, raw_bytes_elements  # noqa: E402
from tests.gateway.memory_payloads import peak_rss, reset_peak  # noqa: E402
from tests.gateway.null_torchserve import NullTorchServe, null_torchserve  # noqa: E402
from tests.images import digit_png, shapes_png  # noqa: E402
from tests.support import GatewayProcess, gateway_process  # noqa: E402
from tools.loop_block import _uint_contents, _zero_length_bytes_raw  # noqa: E402

MIB = 1 << 20
OUT = ROOT / "build" / "attack-table"
API_KEY = "attack-table-key"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
STATUS_NAME = health_pb2.HealthCheckResponse.ServingStatus.Name
#: 512² FCN items in the batch a hung-up caller's request waits behind (seconds of onnxruntime).
HOG_ITEMS = 2


@dataclass
class Row:
    """One attack's outcome on one tree."""

    #: What was sent.
    attack: str
    #: What the attacker got (status and message, or what was counted).
    answer: str
    #: The gateway's peak RSS (VmHWM) over its RSS when the attack began, in MiB.
    rss_growth_mib: float
    #: The gateway's CPU seconds (user + system) during the attack.
    cpu_s: float
    #: The slowest health answer a bystander polling back to back saw, in milliseconds.
    stall_ms: float
    #: Whether the bystander's own calls (health, a digit every 0.25 s) all succeeded.
    others: str
    #: Wall-clock seconds of the attack.
    seconds: float
    #: Whether the gateway survived; "OOM-killed …" or its exit status otherwise.
    gateway: str = "alive"
    #: Which code ran: "before" or "after".
    tree: str = ""


def _setting(name: str) -> Any:
    """A default of the code under test, or None where that code has no such setting."""
    return getattr(Settings(), name, None)


def _oom_kills() -> int:
    """OOM kills so far in this process's memory cgroup (cgroup v1), 0 if unknown."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = Path("/proc/self/cgroup").read_text().splitlines()
        group = next(ln.split(":", 2)[2] for ln in line if ":memory:" in ln)
        root = Path("/sys/fs/cgroup/memory") / group.lstrip("/")
        for entry in (root / "memory.oom_control").read_text().splitlines():
            if entry.startswith("oom_kill "):
                return int(entry.split()[1])
    return 0


def _cgroup_cap_gib() -> float | None:
    """This process's memory cgroup limit in GiB, None if unlimited or unknown."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = Path("/proc/self/cgroup").read_text().splitlines()
        group = next(ln.split(":", 2)[2] for ln in line if ":memory:" in ln)
        limit = int(
            (Path("/sys/fs/cgroup/memory") / group.lstrip("/") / "memory.limit_in_bytes")
            .read_text()
            .strip()
        )
        return limit / (1 << 30) if limit < 1 << 50 else None
    return None


#: Starts a gateway (a context manager that stops it).
Start = Callable[[], AbstractContextManager[GatewayProcess]]

#: A bystander inference slower than this counts as the attack reaching other callers.
SLOW_S = 1.0


def _digit_request() -> pb.ModelInferRequest:
    """One digit to the ConvNet: what a bystander sends."""
    request = pb.ModelInferRequest(model_name="convnet")
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(raw_bytes_elements([digit_png(3)[0]]))
    return request


class Bystander:
    """Another caller while an attack runs: health polled every 10 ms (the slowest answer is
    the stall), a digit inferred every 0.25 s, the gateway's VmHWM sampled (it may die)."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self._gateway = gateway
        self._stop = threading.Event()
        self._connected = threading.Event()
        self.slowest_s = 0.0
        self.slowest_infer_s = 0.0
        self.peak = 0
        self.calls = 0
        self.failures: Counter[str] = Counter()
        self._threads = [
            threading.Thread(target=target) for target in (self._poll, self._infer, self._sample)
        ]

    def __enter__(self) -> Bystander:
        for thread in self._threads:
            thread.start()
        # Connected before the attack begins: an existing caller, not one arriving after it.
        self._connected.wait(30)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _poll(self) -> None:
        url = f"http://127.0.0.1:{self._gateway.http_port}/v2/health/live"
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                asked = time.monotonic()
                try:
                    status = str(client.get(url).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                    time.sleep(0.05)
                self.slowest_s = max(self.slowest_s, time.monotonic() - asked)
                self._count("health", status == "200", status)
                self._connected.set()
                # 100 polls a second at most: a stall over 10 ms is seen, and the polls cost
                # the gateway little CPU (back to back they took ~0.35 CPU s a second).
                self._stop.wait(0.01)

    def _sample(self) -> None:
        """VmHWM every 10 ms, on a thread of its own: a frozen gateway holds the polls."""
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, peak_rss(self._gateway.process.pid))

    def _infer(self) -> None:
        request = _digit_request()
        with grpc.insecure_channel(self._gateway.grpc_target) as channel:
            infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer  # type: ignore[no-untyped-call]
            metadata = (("authorization", f"Bearer {API_KEY}"),)
            while not self._stop.wait(0.25):
                asked = time.monotonic()
                try:
                    infer(request, timeout=30, metadata=metadata)
                    self._count("infer", True, "")
                except grpc.RpcError as exc:
                    self._count("infer", False, exc.code().name)
                self.slowest_infer_s = max(self.slowest_infer_s, time.monotonic() - asked)

    def _count(self, what: str, ok: bool, status: str) -> None:
        self.calls += 1
        if not ok:
            self.failures[f"{what} {status}"] += 1

    def verdict(self) -> str:
        """'unaffected', or how the bystander's calls failed or were held up."""
        slowest = f"slowest inference {self.slowest_infer_s * 1000:,.0f} ms"
        if self.failures:
            failed = ", ".join(f"{n} × {what}" for what, n in self.failures.most_common())
            return f"AFFECTED: {failed} of {self.calls} calls; {slowest}"
        if max(self.slowest_s, self.slowest_infer_s) > SLOW_S:
            return f"DELAYED: {self.calls} calls OK; {slowest}"
        return f"unaffected ({self.calls} calls OK; {slowest})"


def measure(start: Start, attack: str, run: Callable[[GatewayProcess], str]) -> Row:
    """Run one attack against a gateway of its own (so that no attack's leftover heap hides
    another's growth) and record what it cost."""
    with start() as gateway:
        return _measure(gateway, attack, run)


def _warm_up(gateway: GatewayProcess) -> None:
    """One digit and one small scene through both models, so that first-call costs (lazy
    imports, the runners' first batches) are not charged to the attack."""
    scene = pb.ModelInferRequest(model_name="fcn")
    scene.inputs.add(name="image", datatype="BYTES", shape=[1])
    scene.raw_input_contents.append(raw_bytes_elements([shapes_png(side=64)[0]]))
    metadata = (("authorization", f"Bearer {API_KEY}"),)
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer  # type: ignore[no-untyped-call]
        for request in (_digit_request(), scene):
            infer(request, timeout=60, metadata=metadata)
    httpx.get(f"http://127.0.0.1:{gateway.http_port}/v2/health/live", timeout=30)


def _measure(gateway: GatewayProcess, attack: str, run: Callable[[GatewayProcess], str]) -> Row:
    _warm_up(gateway)
    pid = gateway.process.pid
    process = psutil.Process(pid)
    rss_before = reset_peak(pid)
    cpu_before = sum(process.cpu_times()[:2])
    cpu_seen = cpu_before
    kills_before = _oom_kills()
    started = time.monotonic()
    with Bystander(gateway) as bystander:
        try:
            answer = run(gateway)
        except Exception as exc:  # the attack's own client failed: that is its answer
            answer = f"client error: {type(exc).__name__}: {str(exc)[:160]}"
        # The bystander watches for a second at least, so that its verdict means something.
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        with contextlib.suppress(psutil.Error):
            cpu_seen = sum(process.cpu_times()[:2])
    seconds = time.monotonic() - started
    alive = gateway.process.poll() is None
    peak = peak_rss(pid) if alive else bystander.peak
    state = "alive"
    if not alive:
        code = gateway.process.returncode
        cap = _cgroup_cap_gib()
        killed = _oom_kills() > kills_before and cap is not None
        state = f"OOM-killed at the {cap:g} GiB cap" if killed else f"died (exit {code})"
    answer = answer.replace("|", "/").replace("\n", " ")  # one Markdown table cell
    print(f"{attack}: {answer} [{state}]", flush=True)
    return Row(
        attack=attack,
        answer=answer,
        rss_growth_mib=round(max(peak - rss_before, 0) / MIB, 1),
        cpu_s=round(cpu_seen - cpu_before, 2),
        stall_ms=round(bystander.slowest_s * 1000, 1),
        others=bystander.verdict(),
        seconds=round(seconds, 2),
        gateway=state,
    )


# --- big messages -------------------------------------------------------------------------


def _serialized_uint_zeros(size: int, model: str = "fcn") -> bytes:
    """A ModelInfer message of about ``size`` bytes: ``uint_contents`` zeros (one byte each
    packed), built a chunk at a time so the attacker's own memory stays small."""
    request = pb.ModelInferRequest(model_name=model)
    count = size - 64  # the message's other fields
    tensor = request.inputs.add(name="pixels", datatype="UINT8", shape=[count])
    chunk = [0] * MIB
    for start in range(0, count, MIB):
        tensor.contents.uint_contents.extend(chunk[: min(MIB, count - start)])
    return request.SerializeToString()


def _send_serialized(
    gateway: GatewayProcess, message: bytes, metadata: tuple[tuple[str, str], ...] = ()
) -> str:
    """``message`` as a ModelInfer call; the status the caller got."""
    options = [("grpc.max_send_message_length", 1 << 30)]
    with grpc.insecure_channel(gateway.grpc_target, options=options) as channel:
        call = channel.unary_unary(
            INFER_METHOD,
            request_serializer=lambda raw: raw,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        try:
            call(message, timeout=300, metadata=metadata)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {(exc.details() or '')[:160]}"
    return "OK"


def _send(gateway: GatewayProcess, request: pb.ModelInferRequest) -> str:
    """``request`` as a ModelInfer call; the status the caller got."""
    return _send_serialized(gateway, request.SerializeToString())


def _message_at_the_limit(gateway: GatewayProcess) -> str:
    limit = int(_setting("max_message_bytes"))
    message = _serialized_uint_zeros(limit)
    return f"{len(message) / MIB:.1f} MiB: " + _send_serialized(gateway, message)


# --- slow and silent clients --------------------------------------------------------------


def _unread_stream(gateway: GatewayProcess, total: int = 1000) -> str:
    """``total`` FCN requests with 64 KB answers written on one stream, none read."""
    request = pb.ModelInferRequest(model_name="fcn")
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(raw_bytes_elements([shapes_png(side=64)[0]]))
    request.outputs.add(name="scores")

    async def answered() -> float:
        return await metric(gateway.metrics_port, "cnnserve_requests_total", model="fcn")

    async def attack() -> str:
        before = await answered()
        async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()  # type: ignore[no-untyped-call]
            written = 0

            async def write_all() -> None:
                nonlocal written
                for _ in range(total):
                    await call.write(request)
                    written += 1

            writer = asyncio.ensure_future(write_all())
            last, still = before, 0
            for _ in range(240):  # until the count stops for 3 s, at most 2 min
                await asyncio.sleep(0.5)
                now = await answered()
                still = still + 1 if now == last and now > before else 0
                last = now
                if still >= 6:
                    break
            call.cancel()
            writer.cancel()
        return f"{last - before:.0f} of {total} answered unread ({written} written)"

    return asyncio.run(attack())


def _hold(
    port: int, head: bytes, drip: bytes, cap_s: float, every_s: float = 1.0
) -> tuple[float, bytes]:
    """Send ``head``, then ``drip`` a byte every ``every_s`` (slowloris), until the server
    closes the connection or ``cap_s`` passes: how long it held, and what it answered."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.monotonic()
        sock.sendall(head)
        sock.settimeout(every_s)
        answer = b""
        for byte in itertools.cycle(drip):
            if time.monotonic() - started > cap_s:
                break
            try:
                data = sock.recv(65536)
            except TimeoutError:
                with contextlib.suppress(OSError):
                    sock.sendall(bytes([byte]))
                continue
            except OSError:
                break
            if not data:
                break
            answer += data
        return time.monotonic() - started, answer


def _held_text(held_s: float, answer: bytes, cap_s: float) -> str:
    if held_s >= cap_s:
        return f"still open after {cap_s:.0f} s"
    first = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    return f"closed after {held_s:.1f} s: {first or 'no answer'}"


def _slow_headers(gateway: GatewayProcess, cap_s: float) -> str:
    head = b"POST /v2/models/convnet/infer HTTP/1.1\r\nhost: gateway\r\n"
    return _held_text(*_hold(gateway.http_port, head, b"x-slow: " + b"y" * 200, cap_s), cap_s)


def _slow_keyed_body(gateway: GatewayProcess, cap_s: float) -> str:
    head = (
        b"POST /v2/models/convnet/infer HTTP/1.1\r\nhost: gateway\r\n"
        b"authorization: Bearer " + API_KEY.encode() + b"\r\ncontent-length: 1000\r\n\r\n{"
    )
    return _held_text(*_hold(gateway.http_port, head, b" " * 999, cap_s), cap_s)


def _idle_connections(gateway: GatewayProcess, count: int = 1100) -> str:
    """``count`` connections opened and left silent: how many the server holds."""
    sockets = [socket.create_connection(("127.0.0.1", gateway.http_port)) for _ in range(count)]
    try:
        time.sleep(2.0)
        held = refused = closed = 0
        for sock in sockets:
            sock.setblocking(False)
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                held += 1
                continue
            if data.startswith(b"HTTP/1.1 503"):
                refused += 1
            else:
                closed += 1
        with httpx.Client(timeout=10) as client:  # a new caller meanwhile
            try:
                fresh = str(
                    client.get(f"http://127.0.0.1:{gateway.http_port}/v2/health/live").status_code
                )
            except httpx.HTTPError as exc:
                fresh = type(exc).__name__
    finally:
        for sock in sockets:
            sock.close()
    return f"{held} held open, {refused} refused 503, {closed} closed; a new caller: {fresh}"


def _caller_gone_with_work_queued(gateway: GatewayProcess) -> str:
    """An FCN caller hangs up while its request waits behind a 2 × 512² batch: was its
    request computed?"""
    hog = pb.ModelInferRequest(model_name="fcn")
    hog.inputs.add(name="pixels", datatype="UINT8", shape=[HOG_ITEMS, 3, 512, 512])
    hog.raw_input_contents.append(bytes(HOG_ITEMS * 3 * 512 * 512))
    port = gateway.metrics_port

    def items() -> float:
        return asyncio.run(metric(port, "cnnserve_batch_size_sum", model="fcn"))

    computed_before = items()
    cancelled_before = asyncio.run(
        metric(port, "cnnserve_requests_total", model="fcn", outcome="cancelled")
    )
    hog_answer: list[str] = []
    hog_thread = threading.Thread(target=lambda: hog_answer.append(_send(gateway, hog)))
    hog_started = time.monotonic()
    hog_thread.start()
    time.sleep(0.5)  # the hog is taken by the model
    png = shapes_png(side=64)[0]
    with socket.create_connection(("127.0.0.1", gateway.http_port)) as sock:
        sock.sendall(
            b"POST /predict/fcn HTTP/1.1\r\nhost: gateway\r\n"
            + f"content-length: {len(png)}\r\n\r\n".encode()
            + png
        )
        time.sleep(0.3)
    gone_at = time.monotonic() - hog_started
    hog_thread.join()
    hog_s = time.monotonic() - hog_started
    time.sleep(2.0)
    victim = items() - computed_before - HOG_ITEMS
    cancelled = asyncio.run(
        metric(port, "cnnserve_requests_total", model="fcn", outcome="cancelled")
    )
    queued = "queued" if gone_at < hog_s else "NOT queued (the hog was done first)"
    return (
        f"gone caller's request {'COMPUTED' if victim > 0 else 'not computed'}, "
        f"counted cancelled {cancelled - cancelled_before:.0f}; it left at {gone_at:.1f} s, "
        f"{queued} behind a {hog_s:.1f} s batch ({hog_answer[0]})"
    )


# --- health -------------------------------------------------------------------------------


@contextmanager
def _counted_predictions() -> Iterator[Callable[[], int]]:
    """Count the stand-in TorchServe's Predictions calls (batches and readiness probes
    alike). Patched on the class before its server starts: the server binds the method then."""
    counter = itertools.count()
    calls = [0]
    original = NullTorchServe.Predictions

    def counted(self: NullTorchServe, request: Any, context: Any) -> Any:
        calls[0] = next(counter) + 1
        return original(self, request, context)

    NullTorchServe.Predictions = counted  # type: ignore[method-assign]
    try:
        yield lambda: calls[0]
    finally:
        NullTorchServe.Predictions = original  # type: ignore[method-assign]


def _health_under_load(
    gateway: GatewayProcess, backend_calls: Callable[[], int], rounds: int = 3
) -> str:
    """Four callers keep the ConvNet busy while ``rounds`` bursts of 200 concurrent
    ``/v2/health/ready`` and 50 grpc.health Watch streams run: probe inferences (the stand-in's
    calls beyond the gateway's batches) and any not-ready answer."""
    request = _digit_request()
    port = gateway.metrics_port

    async def batches() -> float:
        return await metric(port, "cnnserve_batch_size_count")

    async def attack() -> str:
        seen: Counter[str] = Counter()
        stop = asyncio.Event()
        async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            health = health_pb2_grpc.HealthStub(channel)

            async def load() -> None:
                while not stop.is_set():
                    try:
                        await stub.ModelInfer(request, timeout=30)
                    except grpc.aio.AioRpcError as exc:
                        seen[f"load {exc.code().name}"] += 1

            async def watch() -> None:
                try:
                    async for update in health.Watch(health_pb2.HealthCheckRequest()):
                        seen[f"watch {STATUS_NAME(update.status)}"] += 1
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.CANCELLED:
                        seen[f"watch {exc.code().name}"] += 1

            calls_before, batches_before = backend_calls(), await batches()
            loaders = [asyncio.ensure_future(load()) for _ in range(4)]
            watchers = [asyncio.ensure_future(watch()) for _ in range(50)]
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                url = f"http://127.0.0.1:{gateway.http_port}/v2/health/ready"
                for _ in range(rounds):
                    replies = await asyncio.gather(
                        *(client.get(url) for _ in range(200)), return_exceptions=True
                    )
                    for reply in replies:
                        status = getattr(reply, "status_code", type(reply).__name__)
                        seen[f"ready {status}"] += 1
                    await asyncio.sleep(2.0)
            stop.set()
            await asyncio.gather(*loaders)
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            probes = backend_calls() - calls_before - (await batches() - batches_before)
        flaps = sum(n for what, n in seen.items() if not what.endswith(("200", "SERVING")))
        counts = ", ".join(f"{what} ×{n}" for what, n in sorted(seen.items()))
        return f"{probes:.0f} probe inferences; {flaps} not-ready or failed answers ({counts})"

    return asyncio.run(attack())


# --- inputs that escaped as 500 -----------------------------------------------------------


def _http_post(gateway: GatewayProcess, body: bytes, headers: dict[str, Any] | None = None) -> str:
    reply = httpx.post(
        f"http://127.0.0.1:{gateway.http_port}/v2/models/convnet/infer",
        content=body,
        headers=headers,
        timeout=120,
    )
    return f"{reply.status_code}: {reply.text[:160]}"


def _json_body(**parameters: object) -> bytes:
    """A valid one-digit JSON request with ``parameters``."""
    return json.dumps(
        {
            "parameters": parameters,
            "inputs": [
                {"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}
            ],
        }
    ).encode()


def _bytes_received(port: int) -> int:
    """TCP bytes received so far on the established connections to ``port`` (``ss``: the
    kernel's count, whether or not the gateway has read them)."""
    listing = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(n) for n in re.findall(r"bytes_received:(\d+)", listing))


def _unauthenticated_16_mib(gateway: GatewayProcess) -> str:
    """A 16 MiB ModelInfer without a key: the time to the refusal, and the bytes the
    gateway's side of the connection took in (counted while it is still open)."""
    message = _serialized_uint_zeros(16 * MIB)
    received = _bytes_received(gateway.grpc_port)
    options = [("grpc.max_send_message_length", 1 << 30)]
    with grpc.insecure_channel(gateway.grpc_target, options=options) as channel:
        started = time.monotonic()
        try:
            channel.unary_unary(INFER_METHOD, request_serializer=lambda raw: raw)(
                message, timeout=300
            )
            answer = "OK"
        except grpc.RpcError as exc:
            answer = exc.code().name
        seconds = time.monotonic() - started
        received = _bytes_received(gateway.grpc_port) - received
    return f"{answer} after {seconds:.2f} s; {received / MIB:.2f} MiB received of 16"


# --- the run ------------------------------------------------------------------------------


def run(label: str, work: Path, hold_cap_s: float, only: Sequence[str] = ()) -> list[Row]:
    """Every attack (or those whose name holds one of ``only``) on the code on the path."""
    repository = demo_repository(work)
    rows: list[Row] = []
    header_cap = (_setting("http_header_timeout_s") or 30.0) + 10.0
    body_cap = (_setting("http_body_timeout_s") or 30.0) + 10.0

    def serve(name: str, backend: str = "onnxruntime", **settings: Any) -> Start:
        return lambda: gateway_process(
            backend, work / f"{name}.log", model_repository=repository, **settings
        )

    with _counted_predictions() as backend_calls, null_torchserve() as torchserve:
        plain = serve("onnxruntime", device="cpu")
        keyed = serve("keyed", device="cpu", api_key=API_KEY)
        standin = serve(
            "torchserve",
            "torchserve",
            torchserve_grpc_target=torchserve,
            torchserve_token_auth=False,
            torchserve_registration=False,
            model_store_dir=work / "store",
        )
        attacks: list[tuple[str, Start, Callable[[GatewayProcess], str]]] = [
            (
                "gRPC raw BYTES: 8 MiB of zero-length elements",
                plain,
                lambda g: _send(g, _zero_length_bytes_raw(8 * MIB)),
            ),
            (
                "gRPC typed uint_contents: 8 MiB",
                plain,
                lambda g: _send(g, _uint_contents(8 * MIB)),
            ),
            (
                "gRPC typed uint_contents at max_message_bytes",
                plain,
                _message_at_the_limit,
            ),
            ("ModelStreamInfer: 1,000 FCN requests written, none read", plain, _unread_stream),
            (
                "slowloris: headers a byte a second",
                plain,
                lambda g: _slow_headers(g, min(header_cap, hold_cap_s)),
            ),
            (
                "slowloris: keyed POST, body a byte a second",
                keyed,
                lambda g: _slow_keyed_body(g, min(body_cap, hold_cap_s)),
            ),
            ("1,100 idle HTTP connections", plain, _idle_connections),
            ("HTTP caller hangs up with its request queued", plain, _caller_gone_with_work_queued),
            (
                "health: 3 × 200 concurrent /v2/health/ready + 50 Watch streams, under load",
                standin,
                lambda g: _health_under_load(g, backend_calls),
            ),
            (
                "REST JSON nested 100,000 deep",
                plain,
                lambda g: _http_post(g, b"[" * 100_000 + b"]" * 100_000),
            ),
            (
                "REST JSON with an integer of 5,000 digits",
                plain,
                lambda g: _http_post(g, b'{"id": ' + b"7" * 5000 + b"}"),
            ),
            (
                "Inference-Header-Content-Length: ² (0xB2)",
                plain,
                lambda g: _http_post(
                    g, _json_body(), {"Inference-Header-Content-Length": "²".encode("latin-1")}
                ),
            ),
            (
                '"timeout": 10**400',
                plain,
                lambda g: _http_post(g, _json_body(timeout=10**400)),
            ),
            (
                "unauthenticated 16 MiB ModelInfer, API keys on",
                keyed,
                _unauthenticated_16_mib,
            ),
        ]
        for name, start, attack in attacks:
            if not only or any(part in name for part in only):
                rows.append(measure(start, name, attack))
    for row in rows:
        row.tree = label
    return rows


def markdown(rows: list[Row]) -> str:
    """One run as a Markdown table."""
    lines = [
        "| attack | answer | peak RSS growth | CPU s | longest stall | other callers |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        died = "" if row.gateway == "alive" else f" — gateway {row.gateway}"
        lines.append(
            f"| {row.attack} | {row.answer}{died} | +{row.rss_growth_mib:,.0f} MiB | "
            f"{row.cpu_s:.2f} | {row.stall_ms:,.0f} ms | {row.others} |"
        )
    return "\n".join(lines) + "\n"


def before_after(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str:
    """Both runs side by side, one attack a row."""

    def cell(row: dict[str, Any] | None) -> str:
        if row is None:
            return "—"
        died = "" if row["gateway"] == "alive" else f"; gateway {row['gateway']}"
        return (
            f"{row['answer']}{died}; +{row['rss_growth_mib']:,.0f} MiB, {row['cpu_s']:.2f} CPU s,"
            f" stall {row['stall_ms']:,.0f} ms; others {row['others'].split(' (')[0]}"
        )

    old = {row["attack"]: row for row in before}
    lines = ["| attack | before | after |", "| --- | --- | --- |"]
    lines += [f"| {r['attack']} | {cell(old.get(r['attack']))} | {cell(r)} |" for r in after]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the attacks, write the table and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="after", help="the tree's name: before or after")
    parser.add_argument(
        "--only", action="append", default=[], help="run the attacks whose name holds this text"
    )
    parser.add_argument(
        "--hold-cap-s", type=float, default=45.0, help="longest wait for a server to close"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="attack_table-"))
    rows = run(args.label, work, args.hold_cap_s, args.only)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.label}.json").write_text(
        json.dumps([asdict(row) for row in rows], indent=1) + "\n"
    )
    (args.out / f"{args.label}.md").write_text(markdown(rows))
    print(markdown(rows))
    runs = {name: args.out / f"{name}.json" for name in ("before", "after")}
    if all(path.exists() for path in runs.values()):
        loaded = {name: json.loads(path.read_text()) for name, path in runs.items()}
        (args.out / "table.md").write_text(before_after(loaded["before"], loaded["after"]))


if __name__ == "__main__":
    main()
