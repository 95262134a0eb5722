"""A rolling update of two gateway replicas behind load balancers fails no call.

Two real ``cnnserve serve`` processes (onnxruntime, default settings but their ports) take
continuous load from several concurrent callers on both transports:

- gRPC through client-side ``round_robin`` over both addresses — how a gRPC client balances
  over a Kubernetes headless Service — retrying CANCELLED only (:data:`RETRY_CANCELLED`);
- HTTP through HAProxy (Debian's 2.6): health checks on ``/v2/health/ready``, a request
  that meets a refused connection, a closed connection or a 503 sent to the other replica;
- gRPC through the same HAProxy too (HTTP/2 to the replicas, checked on their HTTP port).

Then each replica in turn is sent SIGTERM, exits once drained, and is replaced by a new
process on the same ports; the next one goes once the replacement is ready and answers the
load. Every call must succeed, and the old and the new process of each replica must have
answered calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest

from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.protocol.grpc_codec import response_from_proto
from tests.gateway.harness import digit_pixels, labels_request_json, metric
from tests.support import (
    GatewayProcess,
    free_ports,
    gateway_process,
    stop_process,
    wait_until_async,
)

HAPROXY = shutil.which("haproxy")
pytestmark = pytest.mark.skipif(
    HAPROXY is None and os.environ.get("CI") != "true",
    reason="haproxy is not installed (apt-get install haproxy); under CI=true this test runs",
)

Stub = pb_grpc.GRPCInferenceServiceStub
#: Concurrent callers of each kind (gRPC round_robin, gRPC and HTTP through HAProxy), each
#: calling in a loop for the whole test.
CALLERS = 4
#: Replicas behind each load balancer.
REPLICAS = 2
#: How long a replacement may take to become ready and answer the load through both
#: balancers (a gRPC client's reconnection backoff to the old address included).
REJOIN_S = 40.0

HAPROXY_CONFIG = """\
global
    maxconn 256

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    # Whole requests in the buffer, so that a retry can resend them.
    option http-buffer-request
    # A refused connection (a replica between its exit and its replacement), a connection
    # closed as the request went out (a drained keep-alive connection) or a 503 (a replica
    # that drains before the next health check sees it): the request never ran there,
    # so it goes to the other replica.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response 503
    # Both backends: round robin over replicas health-checked on their readiness.
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
    # Two failed checks in a row take a replica out: one slow answer on a busy machine
    # must not (with the other replica draining, no server would be left).
    timeout check 2s
    default-server check inter 500ms fall 2 rise 1

frontend gateways
    bind 127.0.0.1:{http_port}
    default_backend replicas

frontend grpc_gateways
    bind 127.0.0.1:{grpc_port} proto h2
    default_backend grpc_replicas

# Each backend says which replica answered, for the per-replica counts (an anonymous
# defaults section cannot hold http-response rules).
backend replicas
    http-response set-header x-served-by %s
{http_servers}

backend grpc_replicas
    http-response set-header x-served-by %s
{grpc_servers}
"""


#: The gRPC callers' service config: retry a call the server CANCELLED, and nothing else. A
#: call that reaches a replica in the instant its drain begins — received by grpc core but not
#: yet handed to the gateway, or sent before the client read the GOAWAY — is cancelled by grpc
#: core, which has no grace for new streams; the server saw the stream, so the client's
#: transparent retry does not cover it (docs/reliability.md, "A drain moves clients on").
#: UNAVAILABLE is not retried: a draining gateway that still took new calls answers that,
#: and this test must see it.
RETRY_CANCELLED = (
    "grpc.service_config",
    json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": "inference.GRPCInferenceService"}],
                    "retryPolicy": {
                        "maxAttempts": 3,
                        "initialBackoff": "0.05s",
                        "maxBackoff": "0.5s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["CANCELLED"],
                    },
                }
            ]
        }
    ),
)


@dataclass
class Replica:
    """One replica's ports (they stay when its process is replaced) and its processes."""

    name: str
    ports: tuple[int, int, int]
    generation: int = 0
    process: GatewayProcess | None = None

    @property
    def label(self) -> str:
        """The replica and which of its processes runs now."""
        return f"{self.name} {'old' if self.generation == 0 else 'new'}"


@dataclass
class Tally:
    """What the load saw: successes by transport and replica, and every failure."""

    grpc_calls: int = 0
    #: Successful HTTP calls by the replica process that answered (``Replica.label``).
    http_calls: Counter[str] = field(default_factory=Counter)
    #: Successful gRPC calls through HAProxy, by the replica process that answered.
    balanced_grpc_calls: Counter[str] = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)
    #: Successful inference calls each replica process counted, as last scraped.
    served: dict[str, float] = field(default_factory=dict)

    def grpc_served(self, label: str) -> float:
        """gRPC calls a replica process answered on the round_robin channel: all it counted
        less those through HAProxy (a lower bound: its count is scraped a moment before)."""
        return self.served.get(label, 0) - self.http_calls[label] - self.balanced_grpc_calls[label]


def _infer_request(count: int) -> tuple[pb.ModelInferRequest, list[int]]:
    pixels, labels = digit_pixels(range(count))
    request = pb.ModelInferRequest(model_name="convnet")
    request.inputs.add(name="pixels", datatype="UINT8", shape=pixels.shape)
    request.raw_input_contents.append(pixels.tobytes())
    request.outputs.add(name="labels")
    return request, labels


async def _grpc_caller(
    stub: pb_grpc.GRPCInferenceServiceStub,
    stop: asyncio.Event,
    tally: Tally,
    through_haproxy: dict[str, Replica] | None = None,
) -> None:
    """Call ModelInfer in a loop; ``through_haproxy``: the replicas by name, to count each
    answer by the replica HAProxy names in ``x-served-by``."""
    request, labels = _infer_request(2)
    via = "gRPC" if through_haproxy is None else "gRPC via HAProxy"
    while not stop.is_set():
        call = stub.ModelInfer(request, timeout=30)
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            tally.failed.append(f"{via} {exc.code().name}: {exc.details()}")
            continue
        (answer,) = response_from_proto(response).outputs
        got = [int(row[0]) for row in answer.data]
        if got != labels:
            tally.failed.append(f"{via} wrong labels {got}")
        if through_haproxy is None:
            tally.grpc_calls += 1
        else:
            served_by = dict(await call.initial_metadata() or ())["x-served-by"]
            tally.balanced_grpc_calls[through_haproxy[str(served_by)].label] += 1


async def _http_caller(
    http: httpx.AsyncClient, replicas: dict[str, Replica], stop: asyncio.Event, tally: Tally
) -> None:
    pixels, labels = digit_pixels(range(1))
    body = labels_request_json(pixels)
    while not stop.is_set():
        try:
            reply = await http.post("/v2/models/convnet/infer", json=body, timeout=30)
        except httpx.TransportError as exc:
            tally.failed.append(f"HTTP {type(exc).__name__}: {exc}")
            continue
        if reply.status_code != 200:
            tally.failed.append(f"HTTP {reply.status_code}: {reply.text}")
            continue
        got = [int(label) for label in reply.json()["outputs"][0]["data"]]
        if got != labels:
            tally.failed.append(f"HTTP wrong labels {got}")
        tally.http_calls[replicas[reply.headers["x-served-by"]].label] += 1


async def _scrape(replicas: list[Replica], stop: asyncio.Event, tally: Tally) -> None:
    """Keep each running process's count of successful calls (until its listener closes)."""
    while not stop.is_set():
        for replica in replicas:
            await _scrape_once(replica, tally)
        await asyncio.sleep(0.1)


async def _scrape_once(replica: Replica, tally: Tally) -> None:
    process = replica.process
    if process is None or process.process.poll() is not None:
        return
    # Draining, the process closes its metrics listener at the end.
    with contextlib.suppress(httpx.HTTPError):
        tally.served[replica.label] = await metric(
            process.metrics_port, "cnnserve_requests_total", model="convnet", outcome="success"
        )


@contextmanager
def _haproxy(replicas: list[Replica], config_path: Path) -> Iterator[tuple[int, int]]:
    """HAProxy in front of the replicas' HTTP and gRPC ports; its HTTP and gRPC ports."""
    assert HAPROXY is not None, "CI=true: the haproxy binary must be installed (.ci/run)"
    http_port, grpc_port = free_ports(2)
    http_servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.ports[1]}" for r in replicas)
    # gRPC over HTTP/2 to the replicas, health-checked on their HTTP port.
    grpc_servers = "\n".join(
        f"    server {r.name} 127.0.0.1:{r.ports[0]} proto h2 port {r.ports[1]} check-proto h1"
        for r in replicas
    )
    config_path.write_text(
        HAPROXY_CONFIG.format(
            http_port=http_port,
            grpc_port=grpc_port,
            http_servers=http_servers,
            grpc_servers=grpc_servers,
        )
    )
    check = subprocess.run(
        [HAPROXY, "-c", "-f", str(config_path)], check=False, capture_output=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    with config_path.with_suffix(".log").open("wb") as log:
        process = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config_path)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield http_port, grpc_port
    finally:
        stop_process(process, 10)


async def _replace(
    replica: Replica, stack: ExitStack, tmp_path: Path, model_repository: Path, tally: Tally
) -> None:
    """SIGTERM the replica's process, wait for its drained exit, start the next on its ports."""
    old = replica.process
    assert old is not None
    await _scrape_once(replica, tally)  # its count and the HTTP one at the same moment
    old.process.send_signal(signal.SIGTERM)
    status = await asyncio.to_thread(old.process.wait, 60)
    assert status == 0, old.output()
    replica.generation += 1
    replica.process = await asyncio.to_thread(_start, replica, stack, tmp_path, model_repository)


def _start(
    replica: Replica, stack: ExitStack, tmp_path: Path, model_repository: Path
) -> GatewayProcess:
    """The replica's next process on its ports, stopped with ``stack`` at the latest."""
    return stack.enter_context(
        gateway_process(
            "onnxruntime",
            tmp_path / f"{replica.name}-{replica.generation}.log",
            ports=replica.ports,
            model_repository=model_repository,
            device="cpu",
        )
    )


async def test_rolling_update_behind_load_balancers_fails_no_call(
    model_repository: Path, tmp_path: Path
) -> None:
    """Load on both transports, gRPC both ways, through the whole rolling update of both
    replicas: no call fails, and every old and every new replica process answered each kind
    of caller."""
    replicas = [
        Replica(f"r{i}", (p[0], p[1], p[2]))
        for i, p in enumerate([free_ports(3) for _ in range(REPLICAS)])
    ]
    by_name = {r.name: r for r in replicas}
    tally = Tally()
    stop = asyncio.Event()
    with ExitStack() as stack:
        started = await asyncio.gather(
            *(asyncio.to_thread(_start, r, stack, tmp_path, model_repository) for r in replicas)
        )
        for replica, process in zip(replicas, started, strict=True):
            replica.process = process
        http_port, grpc_port = stack.enter_context(_haproxy(replicas, tmp_path / "haproxy.cfg"))
        target = "ipv4:" + ",".join(f"127.0.0.1:{r.ports[0]}" for r in replicas)
        async with (
            grpc.aio.insecure_channel(
                target, options=[("grpc.lb_policy_name", "round_robin"), RETRY_CANCELLED]
            ) as channel,
            grpc.aio.insecure_channel(
                f"127.0.0.1:{grpc_port}", options=[RETRY_CANCELLED]
            ) as balanced,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http,
        ):
            stub = Stub(channel)
            await wait_until_async(
                lambda: _ready_through(http), 20, "HAProxy to find both replicas ready"
            )
            load = [
                *(_grpc_caller(stub, stop, tally) for _ in range(CALLERS)),
                *(_grpc_caller(Stub(balanced), stop, tally, by_name) for _ in range(CALLERS)),
                *(_http_caller(http, by_name, stop, tally) for _ in range(CALLERS)),
                _scrape(replicas, stop, tally),
            ]
            running = asyncio.gather(*load)
            try:
                for replica in replicas:
                    await _answering(replica, tally)
                for replica in replicas:
                    await _replace(replica, stack, tmp_path, model_repository, tally)
                    await _answering(replica, tally)
            finally:
                stop.set()
                await running
    http_calls = sum(tally.http_calls.values())
    balanced_calls = sum(tally.balanced_grpc_calls.values())
    per_process = {
        label: f"{tally.http_calls[label]} HTTP, {tally.balanced_grpc_calls[label]} gRPC via "
        f"HAProxy, >= {tally.grpc_served(label):.0f} gRPC round_robin"
        for label in sorted(tally.served)
    }
    print(
        f"\ncalls: {tally.grpc_calls + balanced_calls + http_calls} ({tally.grpc_calls} gRPC "
        f"round_robin, {balanced_calls} gRPC via HAProxy, {http_calls} HTTP via HAProxy), "
        f"failed: {len(tally.failed)}; answered by process: {per_process}"
    )
    assert not tally.failed, tally.failed[:20]
    # Each old and new process answered every kind of caller (the waits checked it too).
    processes = sorted(f"{r.name} {g}" for r in replicas for g in ("new", "old"))
    assert sorted(tally.served) == processes, tally.served
    for counts in (tally.http_calls, tally.balanced_grpc_calls):
        assert all(counts[label] > 0 for label in processes), counts


async def _ready_through(http: httpx.AsyncClient) -> bool:
    """Whether HAProxy sends requests to both replicas (two answers, two servers)."""
    served_by = set()
    for _ in range(REPLICAS * 2):
        try:
            reply = await http.get("/v2/health/ready")
        except httpx.TransportError:
            return False  # HAProxy not listening yet
        if reply.status_code != 200:
            return False
        served_by.add(reply.headers["x-served-by"])
    return len(served_by) == REPLICAS


async def _answering(replica: Replica, tally: Tally) -> None:
    """Wait until the replica's current process has answered each kind of caller.

    A new process on the old ports is found by the gRPC client only when its reconnection
    backoff runs out (a new pod behind a headless Service has a new address, found when the
    client resolves again); the next replica goes only once this one takes load again.
    """
    label = replica.label

    def answering() -> bool:
        return (
            tally.http_calls[label] > 0
            and tally.balanced_grpc_calls[label] > 0
            and tally.grpc_served(label) > 0
        )

    await wait_until_async(answering, REJOIN_S, f"{label} to answer every kind of caller")
