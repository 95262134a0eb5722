"""Start and stop a real ``cnnserve serve`` process for a benchmark scenario."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

from cnnserve.export.repository import ensure_default_repository
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc

from .process_tree import cpu_seconds, resident_bytes


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports nothing listens on right now (all held open while they
    are chosen, so no two are the same)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class GatewayProcess:
    """A running gateway and its ports."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    metrics_port: int
    log_path: Path

    @property
    def grpc_target(self) -> str:
        """``host:port`` of the gRPC listener."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_target(self) -> str:
        """``host:port`` of the HTTP listener (OIP REST, ``/predict``)."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """URL of the Prometheus text endpoint."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def output(self) -> str:
        """Everything the gateway printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def processes(self) -> list[psutil.Process]:
        """The gateway process and its children (the workers when it runs several)."""
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def rss_bytes(self) -> int:
        """Resident memory of the gateway, all its processes together."""
        return resident_bytes(self.processes())

    def cpu_seconds(self) -> float:
        """CPU time the gateway's processes have used so far, together."""
        return cpu_seconds(self.processes())

    def grpc_listeners(self) -> int:
        """How many of its processes listen on the gRPC port."""
        count = 0
        for process in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                count += any(
                    c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.grpc_port
                    for c in process.net_connections(kind="tcp")
                )
        return count

    def stop(self) -> None:
        """SIGTERM, then wait (the gateway drains); kill if it does not exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def demo_repository(artifacts: Path) -> Path:
    """The default model repository (the demo models, version 1) kept in ``artifacts``, made
    on first use: what the benchmark gateways serve."""
    root = artifacts / "repository"
    ensure_default_repository(root)
    return root


def start_gateway(
    backend: str,
    env_overrides: Mapping[str, str],
    log_path: Path,
    ready_timeout_s: float = 120.0,
    environ: Mapping[str, str] | None = None,
    ports: tuple[int, int, int] | None = None,
) -> GatewayProcess:
    """Run ``cnnserve serve`` on free ports (or ``ports``: gRPC, HTTP, metrics — a
    replacement on the ports of the process it replaces) and wait until gRPC ServerReady
    says true (and, with ``CNNSERVE_GATEWAY_PROCESSES``, until every process listens, so the
    load reaches all of them). Its environment is ``environ`` (default: this process's) with
    ``env_overrides``; its output is appended to ``log_path``."""
    grpc_port, http_port, metrics_port = ports or free_ports(3)
    env = {**(os.environ if environ is None else environ), **env_overrides}
    listeners = int(env.get("CNNSERVE_GATEWAY_PROCESSES", "1"))
    command = [
        sys.executable, "-m", "cnnserve", "serve", "--backend", backend, "--host", "127.0.0.1",
        "--grpc-port", str(grpc_port), "--http-port", str(http_port),
        "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    gateway = GatewayProcess(process, grpc_port, http_port, metrics_port, log_path)
    deadline = time.monotonic() + ready_timeout_s
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with {process.returncode} while starting; "
                    f"its output ({log_path}):\n{_tail(gateway.output())}"
                )
            try:
                ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready
                if ready and gateway.grpc_listeners() >= listeners:
                    return gateway
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    gateway.stop()
    raise RuntimeError(
        f"gateway not ready after {ready_timeout_s}s; its output ({log_path}):\n"
        f"{_tail(gateway.output())}"
    )


def _tail(text: str, lines: int = 40) -> str:
    """The last ``lines`` lines of a process's output, for an error message."""
    return "\n".join(text.splitlines()[-lines:])
