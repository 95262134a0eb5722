"""Soak: mixed valid and invalid traffic through a real gateway while faults are injected.

``cnnserve soak --duration-s 60 --max-requests 20000`` (``make soak``)
starts a ``cnnserve serve`` process and sends requests from :mod:`.soak_traffic` — valid and
invalid, over gRPC and HTTP, from several concurrent callers — until the duration or the
request count runs out, while faults are injected every ``--fault-interval-s``:

- ``--backend torchserve`` (needs Java 17): two TorchServe replicas behind the gateway; the
  faults take turns: one replica SIGKILLed and, a moment later, started again on the same
  ports; the other replica's convnet worker stalled (SIGSTOP) for ``--stall-s``;
- ``--backend onnxruntime``: the gateway process itself stalled for ``--stall-s``.

It prints what was sent, succeeded, rejected (by the error table's reason), failed (a wrong
answer), lost (no answer at all; must be 0), and the gateway's RSS at start and end; it
exits 1 when anything failed or was lost. Bounded: a fault in progress when time runs out
(a restart) is finished first, so a run may end a few seconds after ``--duration-s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc
import httpx
import numpy as np
import psutil

from cnnserve.models.runtime import load_runner
from cnnserve.models.steps import normalize
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.torchserve_engine.process import start

from .gateway_process import GatewayProcess, demo_repository, start_gateway
from .soak_traffic import Shot, Verdict, fire_grpc, fire_http, make_shots, valid
from .torchserve_run import TorchServeRun, running_torchserve

Backend = Literal["torchserve", "onnxruntime"]
#: How long a killed replica stays down before it is started again.
DOWN_S = 2.0
#: The gateway's timeout on one TorchServe call (``torchserve_call_timeout_s``): a stall
#: longer than this is answered.
BACKEND_TIMEOUT_S = 5


@dataclass
class SoakOptions:
    """One soak run."""

    artifacts_dir: Path
    work_dir: Path
    backend: Backend = "onnxruntime"
    duration_s: float = 60.0
    max_requests: int = 100_000
    concurrency: int = 8
    fault_interval_s: float = 8.0
    stall_s: float = 2.0
    #: Share of requests that go over HTTP (when they can).
    http_share: float = 0.3
    seed: int = 0


@dataclass
class Tally:
    """What happened to every request sent, and the faults injected meanwhile."""

    sent: int = 0
    succeeded: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)
    faults: list[str] = field(default_factory=list)
    rss_start_bytes: int = 0
    rss_end_bytes: int = 0
    seconds: float = 0.0

    def add(self, verdict: Verdict) -> None:
        """Count one request's verdict."""
        if verdict.outcome == "succeeded":
            self.succeeded += 1
        else:
            getattr(self, verdict.outcome)[verdict.reason] += 1

    def summary(self) -> str:
        """The figures, one per line."""

        def by_reason(counts: Counter[str]) -> str:
            detail = ", ".join(f"{reason} {n}" for reason, n in counts.most_common())
            return f"{counts.total()}" + (f" ({detail})" if detail else "")

        return "\n".join(
            [
                f"duration   {self.seconds:.1f} s",
                f"faults     {len(self.faults)}: {'; '.join(self.faults) or 'none'}",
                f"sent       {self.sent}",
                f"succeeded  {self.succeeded}",
                f"rejected   {by_reason(self.rejected)}",
                f"failed     {by_reason(self.failed)}",
                f"lost       {by_reason(self.lost)}",
                f"RSS        start {self.rss_start_bytes / 2**20:.0f} MiB, "
                f"end {self.rss_end_bytes / 2**20:.0f} MiB",
            ]
        )


Fault = Callable[[], Awaitable[str]]


class Replica:
    """A TorchServe replica that faults may kill and start again (same ports, same store)."""

    def __init__(self, run: TorchServeRun) -> None:
        self.settings = run.settings
        self.server = run.server

    def kill(self) -> None:
        """SIGKILL the JVM and its workers, as a crashed container would go."""
        try:
            jvm = psutil.Process(self.server.pid)
            processes = [jvm, *jvm.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(processes, timeout=30)

    def restart(self) -> None:
        """Start it again; returns once its workers are READY."""
        self.server = start(self.settings, self.server.model_store)

    def worker_pid(self, model: str) -> int:
        """The pid of ``model``'s worker (token authorization is off on replicas)."""
        reply = httpx.get(f"{self.server.management_url}/models/{model}", timeout=10.0)
        reply.raise_for_status()
        return int(reply.json()[0]["workers"][0]["pid"])


async def _stall(pid: int, seconds: float) -> None:
    """SIGSTOP ``pid`` for ``seconds``, then SIGCONT (always)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def replica_faults(replicas: list[Replica], stall_s: float) -> list[Fault]:
    """Kill and restart the second replica; stall the first replica's convnet worker."""
    survivor, victim = replicas

    async def kill_and_restart() -> str:
        await asyncio.to_thread(victim.kill)
        await asyncio.sleep(DOWN_S)
        started = time.monotonic()
        await asyncio.to_thread(victim.restart)
        return f"replica killed, restarted in {time.monotonic() - started:.0f} s"

    async def stall_worker() -> str:
        await _stall(await asyncio.to_thread(survivor.worker_pid, "convnet"), stall_s)
        return f"convnet worker stalled {stall_s:g} s"

    return [kill_and_restart, stall_worker]


def gateway_faults(gateway: GatewayProcess, stall_s: float) -> list[Fault]:
    """Stall the gateway process itself (as a VM pause or a long GC would)."""

    async def stall_gateway() -> str:
        await _stall(gateway.process.pid, stall_s)
        return f"gateway stalled {stall_s:g} s"

    return [stall_gateway]


async def _inject(
    faults: list[Fault], interval_s: float, done: asyncio.Event, tally: Tally
) -> None:
    """Run the faults in turn, one every ``interval_s``, until ``done``."""
    for fault in itertools.cycle(faults):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), interval_s)
            return
        tally.faults.append(await fault())


async def _soak(
    gateway: GatewayProcess, shots: list[Shot], faults: list[Fault], options: SoakOptions
) -> Tally:
    tally = Tally()
    options_grpc = [("grpc.max_receive_message_length", 64 << 20)]
    async with (
        grpc.aio.insecure_channel(gateway.grpc_target, options=options_grpc) as channel,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        for shot in filter(valid, shots):  # warm up; every valid request must work at rest
            warmup = await fire_grpc(stub, shot)
            if warmup.outcome != "succeeded":
                raise RuntimeError(f"{shot.name} does not work before any fault: {warmup}")
        tally.rss_start_bytes = gateway.rss_bytes()
        started = time.monotonic()
        stop_at = started + options.duration_s

        async def caller(index: int) -> None:
            rng = random.Random(options.seed * 1000 + index)
            while time.monotonic() < stop_at and tally.sent < options.max_requests:
                shot = rng.choice(shots)
                http_turn = not shot.over_grpc or rng.random() < options.http_share
                tally.sent += 1
                if http_turn and shot.over_http:
                    tally.add(await fire_http(http, shot))
                else:
                    tally.add(await fire_grpc(stub, shot))

        done = asyncio.Event()
        injector = asyncio.create_task(_inject(faults, options.fault_interval_s, done, tally))
        try:
            await asyncio.gather(*(caller(i) for i in range(options.concurrency)))
        finally:
            done.set()
            await injector  # a fault in progress (a restart) finishes first
        tally.seconds = time.monotonic() - started
        tally.rss_end_bytes = gateway.rss_bytes()
    return tally


def _expected_labels(
    artifact: Path, fmt: Literal["torchscript", "onnx"]
) -> Callable[[np.ndarray], list[int]]:
    """Labels the backend's own artifact gives, computed in this process."""
    runner = load_runner(artifact, fmt, "cpu")
    return lambda pixels: runner.infer(normalize(pixels)).argmax(axis=1).tolist()


@contextlib.contextmanager
def _replicas(options: SoakOptions) -> Iterator[list[Replica]]:
    with contextlib.ExitStack() as stack:
        runs = [
            stack.enter_context(
                running_torchserve(options.work_dir / f"replica{i}", 1, 0,
                                   token_auth=False)
            )
            for i in range(2)
        ]  # fmt: skip
        # Stopping reads each store's saved state: a replica a fault restarted is stopped too.
        yield [Replica(run) for run in runs]


def run_soak(options: SoakOptions) -> Tally:
    """Start what the backend needs, soak it, stop everything; the tally."""
    log = options.work_dir / "gateway.log"
    options.work_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if options.backend == "torchserve":
            replicas = stack.enter_context(_replicas(options))
            env = {
                "CNNSERVE_TORCHSERVE_GRPC_TARGET": "ipv4:"
                + ",".join(r.server.grpc_target for r in replicas),
                "CNNSERVE_TORCHSERVE_TOKEN_AUTH": "false",
                "CNNSERVE_TORCHSERVE_CALL_TIMEOUT_S": str(BACKEND_TIMEOUT_S),
            }
            labels = _expected_labels(options.artifacts_dir / "convnet.pt", "torchscript")
        else:
            env = {
                "CNNSERVE_MODEL_REPOSITORY": str(demo_repository(options.artifacts_dir)),
                "CNNSERVE_DEVICE": "cpu",
                "CNNSERVE_INFERENCE_THREADS": "1",
            }
            labels = _expected_labels(options.artifacts_dir / "convnet.onnx", "onnx")
        gateway = start_gateway(options.backend, env, log)
        stack.callback(gateway.stop)
        faults = (
            replica_faults(replicas, options.stall_s)
            if options.backend == "torchserve"
            else gateway_faults(gateway, options.stall_s)
        )
        return asyncio.run(_soak(gateway, make_shots(labels), faults, options))
