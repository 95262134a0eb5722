"""Several gateway processes on one set of ports: a real ``cnnserve serve`` supervisor with
two workers sharing gRPC and HTTP (SO_REUSEPORT), metrics summed (``process_*`` by pid),
SIGTERM drains them all — by default as frontends of one batching process
(``shared_batcher``), whose batches hold both frontends' requests; a frontend or the
batching process that dies stops them all."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cnnserve.bench.loadgen import infer_request
from cnnserve.gateway.processes import run_processes
from cnnserve.gateway.server import serve_forever
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.settings import Settings
from tests.support import GatewayProcess, gateway_process, wait_until

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _sample_sum(metrics_url: str, name: str, **labels: str) -> float:
    """The sum of every sample ``name`` carrying ``labels``, over all processes."""
    text = httpx.get(metrics_url, timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def _process_pids(metrics_url: str) -> set[str]:
    """The ``pid`` labels of the ``process_*`` CPU series the metrics port serves."""
    text = httpx.get(metrics_url, timeout=10).text
    return {
        sample.labels["pid"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "process_cpu_seconds_total"
    }


def _requests_total(metrics_url: str) -> float:
    return _sample_sum(metrics_url, "cnnserve_requests_total", outcome="success")


def _mean_batch(metrics_url: str) -> float:
    count = _sample_sum(metrics_url, "cnnserve_batch_size_count", model="convnet")
    return _sample_sum(metrics_url, "cnnserve_batch_size_sum", model="convnet") / count


def _callers(
    target: str, concurrency: int, calls_each: int, sizes: tuple[int, ...] = (2, 3, 1)
) -> dict[grpc.StatusCode, int]:
    """``concurrency`` callers, each on its own connection (the kernel spreads connections
    over the processes), each making ``calls_each`` calls of ``sizes`` items in turn; how
    the calls ended. A call that reaches its 60 s deadline ends as DEADLINE_EXCEEDED."""
    outcomes: dict[grpc.StatusCode, int] = {}
    lock = threading.Lock()

    def caller(index: int) -> None:
        options = [("test.connection", index)]
        with grpc.insecure_channel(target, options=options) as channel:
            call = channel.unary_unary(MODEL_INFER)
            for number in range(calls_each):
                count = sizes[(index + number) % len(sizes)]
                request = infer_request("convnet", np.zeros((count, 3, 28, 28), np.float32))
                try:
                    reply = pb.ModelInferResponse.FromString(call(request, timeout=60))
                    assert reply.outputs[0].shape[0] == count
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()  # type: ignore[attr-defined]
                with lock:
                    outcomes[code] = outcomes.get(code, 0) + 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


@contextlib.contextmanager
def _in_background(
    target: str, concurrency: int, calls_each: int
) -> Iterator[dict[grpc.StatusCode, int]]:
    """:func:`_callers` in a thread; on exit, waits for them and fills the outcomes."""
    outcomes: dict[grpc.StatusCode, int] = {}
    thread = threading.Thread(
        target=lambda: outcomes.update(_callers(target, concurrency, calls_each))
    )
    thread.start()
    try:
        yield outcomes
    finally:
        thread.join()


def _batching_process(gateway: GatewayProcess) -> psutil.Process:
    """The child listening on the batching socket."""
    for process in gateway.processes()[1:]:
        with contextlib.suppress(psutil.NoSuchProcess):
            sockets = [str(c.laddr) for c in process.net_connections("unix")]
            if process.status() != psutil.STATUS_ZOMBIE and any(
                path.endswith("batching.sock") for path in sockets
            ):
                return process
    raise AssertionError("no batching process found")


def _frontends(gateway: GatewayProcess) -> list[psutil.Process]:
    """The children listening on the gRPC port."""
    found = []
    for process in gateway.processes()[1:]:
        with contextlib.suppress(psutil.NoSuchProcess):
            if any(
                c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == gateway.grpc_port
                for c in process.net_connections(kind="tcp")
            ):
                found.append(process)
    return found


def _two_onnxruntime_processes(
    model_repository: Path, tmp_path: Path, **settings: object
) -> contextlib.AbstractContextManager[GatewayProcess]:
    """A real supervisor of two gateway processes over ONNX Runtime on the CPU."""
    return gateway_process(
        "onnxruntime",
        tmp_path / "gateway.log",
        model_repository=model_repository,
        gateway_processes=2,
        device="cpu",
        **settings,
    )


def test_two_processes_share_the_ports_and_drain_on_sigterm(
    model_repository: Path, tmp_path: Path
) -> None:
    with _two_onnxruntime_processes(model_repository, tmp_path) as gateway:
        assert gateway.grpc_listeners() == 2  # two workers; the supervisor serves nothing
        request = infer_request("convnet", np.zeros((1, 3, 28, 28), np.float32))
        # Separate connections: the kernel spreads connections, not calls, over the workers.
        for index in range(8):
            options = [("test.connection", index)]
            with grpc.insecure_channel(gateway.grpc_target, options=options) as channel:
                call = channel.unary_unary(MODEL_INFER)
                for _ in range(3):
                    reply = pb.ModelInferResponse.FromString(call(request, timeout=30))
                    assert reply.model_name == "convnet"
        for _ in range(4):
            ready = httpx.get(f"http://127.0.0.1:{gateway.http_port}/v2/health/ready", timeout=10)
            assert ready.status_code == 200
        # One metrics port, every worker's requests summed.
        assert _requests_total(gateway.metrics_url) == 24
        # ... and every gateway process's CPU and memory, each under its pid.
        gateway_pids = [*_frontends(gateway), _batching_process(gateway)]
        assert _process_pids(gateway.metrics_url) == {str(p.pid) for p in gateway_pids}
        children = gateway.processes()[1:]
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=60) == 0
        # Workers are joined before the supervisor exits; multiprocessing's resource tracker
        # follows it within moments.
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
    log = gateway.output()
    assert "2 gateway processes" in log
    assert log.count("gateway stopped") == 2
    # Shared batcher: each model loaded once, by the batching process, which stopped last.
    assert log.count("loaded for the frontends") == 2
    assert log.rindex("batching process stopped") > log.rindex("gateway stopped")


def test_two_frontends_batch_together_at_least_as_fully_as_one_process(
    model_repository: Path, tmp_path: Path
) -> None:
    means = {}
    for name, processes, shared in (
        ("one process", 1, True),
        ("two frontends", 2, True),
        ("two gateways", 2, False),
    ):
        with gateway_process(
            "onnxruntime",
            tmp_path / f"{name}.log",
            model_repository=model_repository,
            gateway_processes=processes,
            shared_batcher=shared,
            device="cpu",
            # Room for every caller to queue: a batch goes once all recent callers wait
            # (adaptive delay), so its size says how many callers one batcher sees.
            max_batch_delay_ms=100,
        ) as gateway:
            outcomes = _callers(gateway.grpc_target, concurrency=16, calls_each=30)
            assert outcomes == {grpc.StatusCode.OK: 16 * 30}
            if processes == 2:
                assert len(_frontends(gateway)) == 2
            means[name] = _mean_batch(gateway.metrics_url)
    # The frontends' requests meet in the batching process's batches; two independent
    # gateways each batch only the callers the kernel hashed to them, a split that differs
    # from run to run (their mean was 13.0 and 14.3 against the two frontends' 21.8 and 17.5
    # in two CI runs). One process against two frontends varies either way by about a fifth
    # between runs on a busy host (16.6 vs 21.8, 21.8 vs 17.8).
    assert means["two frontends"] >= 0.75 * means["one process"], means
    assert means["two frontends"] >= 1.1 * means["two gateways"], means


@pytest.mark.parametrize("victim", ["frontend", "batching process"])
def test_a_process_killed_stops_them_all_and_no_call_hangs(
    model_repository: Path, tmp_path: Path, victim: str
) -> None:
    with _two_onnxruntime_processes(model_repository, tmp_path) as gateway:
        children = gateway.processes()[1:]
        target = _frontends(gateway)[0] if victim == "frontend" else _batching_process(gateway)
        with _in_background(gateway.grpc_target, concurrency=8, calls_each=200) as outcomes:
            wait_until(lambda: _requests_total(gateway.metrics_url) >= 50, 60, "calls to flow")
            target.kill()
            assert gateway.process.wait(timeout=60) == 1  # the supervisor noticed
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
    # Calls in flight ended (served, or refused as the processes stopped); none waited for
    # its deadline.
    assert grpc.StatusCode.DEADLINE_EXCEEDED not in outcomes, outcomes
    assert outcomes[grpc.StatusCode.OK] >= 50
    assert "stopped by itself" in gateway.output()


def test_sigterm_drains_calls_waiting_in_the_shared_batcher(
    model_repository: Path, tmp_path: Path
) -> None:
    with (
        _two_onnxruntime_processes(
            model_repository,
            tmp_path,
            # Requests wait in the batching process's queue for 3 s: the drain lets them run.
            max_batch_delay_ms=3000,
            adaptive_batch_delay=False,
        ) as gateway,
        _in_background(gateway.grpc_target, concurrency=3, calls_each=1) as outcomes,
    ):
        wait_until(
            lambda: _sample_sum(gateway.metrics_url, "cnnserve_queue_depth") == 6,
            30,
            "the three calls (2 + 3 + 1 items) to wait in the shared queue",
        )
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=60) == 0
    assert outcomes == {grpc.StatusCode.OK: 3}


def test_several_processes_need_fixed_ports() -> None:
    with pytest.raises(ValueError, match="fixed gRPC, HTTP and metrics ports"):
        run_processes(Settings(gateway_processes=2, grpc_port=0), serve_forever)
