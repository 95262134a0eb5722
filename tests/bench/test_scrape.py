"""The bench's readings of a gateway's metrics endpoint, from a real HTTP server serving a
real ``GatewayMetrics`` scrape (GPUs from the stand-in NVML of the GPU metrics tests)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cnnserve.bench.scrape import batch_sizes, gpu_memory_used_bytes
from cnnserve.gateway.metrics import GatewayMetrics
from tests.gateway.nvml import GIB, fake_nvml


@contextmanager
def metrics_url(metrics: GatewayMetrics) -> Iterator[str]:
    """``metrics`` rendered at each GET of ``http://127.0.0.1:<port>/metrics``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = metrics.render()
            self.send_response(200)
            self.send_header("Content-Type", GatewayMetrics.CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def test_gpu_memory_is_every_device_s_summed(monkeypatch: pytest.MonkeyPatch) -> None:
    devices = [("NVIDIA H200", 90, 30 * GIB, 141 * GIB), ("NVIDIA H200", 10, 2 * GIB, 141 * GIB)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices))
    with metrics_url(GatewayMetrics()) as url:
        assert gpu_memory_used_bytes(url) == 32 * GIB


def test_no_gpu_memory_without_gpu_metrics() -> None:
    with metrics_url(GatewayMetrics(gpu_metrics=False)) as url:
        assert gpu_memory_used_bytes(url) is None


def test_batch_sizes_of_one_model() -> None:
    metrics = GatewayMetrics()
    for size in (3, 5):
        metrics.observer("convnet", "1").batch_done(size, 0.0, 0.01, 0.0)
    metrics.observer("fcn", "1").batch_done(8, 0.0, 0.01, 0.0)
    with metrics_url(metrics) as url:
        reading = batch_sizes(url, "convnet")
    assert (reading.batches, reading.items, reading.mean) == (2, 8, 4)
    assert reading.buckets["4.0"] == 1
