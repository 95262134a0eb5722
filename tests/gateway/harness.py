"""A real gateway on free ports for transport tests, and what they read back from it."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from cnnserve.gateway.backends import Backend
from cnnserve.gateway.dataplane import DataPlane, create_core
from cnnserve.gateway.server import Gateway
from cnnserve.models.repository import ModelVersion
from cnnserve.models.steps import normalize
from cnnserve.settings import Settings
from tests.images import digit_png
from tests.support import wait_until_async


def gateway_settings(repository: Path, **overrides: Any) -> Settings:
    """Settings for an in-process onnxruntime gateway serving the model ``repository``, on
    free ports (port 0 everywhere)."""
    values: dict[str, Any] = {
        "model_repository": repository,
        "backend": "onnxruntime",
        "device": "cpu",
        "host": "127.0.0.1",
        "grpc_port": 0,
        "http_port": 0,
        "metrics_port": 0,
        "drain_grace_s": 10.0,
    }
    values.update(overrides)
    return Settings(**values)


async def raw_http(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, str]:
    """One HTTP/1.1 request with ``path`` exactly as given — no client normalises its dot
    segments or percent-escapes away, as a hostile client would not; the status and the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}"
        "\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + body)
    await writer.drain()
    reply = (await reader.read()).decode("latin-1")
    writer.close()
    await writer.wait_closed()
    head, _, text = reply.partition("\r\n\r\n")
    return int(head.split()[1]), text


@asynccontextmanager
async def running_gateway(
    settings: Settings, core: DataPlane | None = None
) -> AsyncIterator[Gateway]:
    """A started gateway (the real core over ``settings.backend`` unless ``core`` is given)."""
    gateway = Gateway(settings, core or await create_core(settings))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop(5.0)


class StubBackend:
    """The lifecycle of a test backend: nothing to open, every version loads and is ready;
    subclasses say what a batch does."""

    async def start(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to release."""

    async def load(self, model: ModelVersion) -> None:
        """Every version loads."""

    async def unload(self, model: ModelVersion) -> None:
        """Nothing to release."""

    async def ready(self, model: ModelVersion) -> bool:
        """Claims readiness so requests reach ``infer_batch``."""
        return True


class ExplodingBackend(StubBackend):
    """A backend whose batches fail with an internal detail that must never reach a caller."""

    SECRET = "secret-internal-detail-/opt/model/weights"

    async def infer_batch(self, model: ModelVersion, batch: np.ndarray) -> np.ndarray:
        """Fail like a bug would."""
        raise RuntimeError(self.SECRET)

    def describe(self) -> str:
        """Platform name for metadata."""
        return "exploding"

    def decodes_images(self, model: ModelVersion) -> bool:
        return False

    def takes_pixels(self, model: ModelVersion) -> bool:
        """Float32 batches only."""
        return False


def holding_settings(repository: Path, delay_ms: float, **overrides: Any) -> Settings:
    """A gateway whose lone requests wait ``delay_ms`` in the queue for company.

    Adaptive delay (a partial batch leaves at once when no other caller is around) is off,
    so a test can observe a request while it is queued: deterministic, not timed.
    """
    return gateway_settings(
        repository, max_batch_delay_ms=delay_ms, adaptive_batch_delay=False, **overrides
    )


def exploding_core(settings: Settings) -> DataPlane:
    """A real data plane over :class:`ExplodingBackend`."""
    backend: Backend = ExplodingBackend()
    return DataPlane(settings, backend)


async def metric_samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample on the metrics endpoint: ``(name, labels) → value``."""
    async with httpx.AsyncClient() as client:
        reply = await client.get(f"http://127.0.0.1:{port}/metrics")
    reply.raise_for_status()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


async def metric(port: int, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` carrying ``labels`` (and any others, such as each
    version of a model); 0 when there is none."""
    wanted = set(labels.items())
    return sum(
        value
        for (sample, sample_labels), value in (await metric_samples(port)).items()
        if sample == name and wanted <= sample_labels
    )


async def wait_for_metric(port: int, name: str, at_least: float, **labels: str) -> None:
    """Poll until a sample reaches ``at_least`` (the tests' only way to wait on the server)."""

    async def reached() -> bool:
        return await metric(port, name, **labels) >= at_least

    await wait_until_async(reached, 10.0, f"{name}{labels} to reach {at_least}", 0.01)


def digit_pixels(indices: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """Held-out digits as UINT8 ``N×3×28×28`` pixels (what the gateway makes of the PNGs)."""
    from cnnserve.models.registry import get_spec

    spec = get_spec("convnet")
    pngs = [digit_png(i) for i in indices]
    pixels = np.stack([spec.image_to_pixels(png) for png, _ in pngs])
    return pixels, [label for _, label in pngs]


def labels_request_json(pixels: np.ndarray) -> dict[str, Any]:
    """An OIP JSON inference request for the ConvNet's ``labels`` of UINT8 ``pixels``."""
    return {
        "inputs": [
            {
                "name": "pixels",
                "datatype": "UINT8",
                "shape": list(pixels.shape),
                "data": pixels.ravel().tolist(),
            }
        ],
        "outputs": [{"name": "labels"}],
    }


def digit_input(indices: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """Held-out digits as the FP32 ``N×3×28×28`` network input, and their labels."""
    pixels, labels = digit_pixels(indices)
    return normalize(pixels), labels


def raw_bytes_elements(items: Sequence[bytes]) -> bytes:
    """The OIP raw format of a BYTES tensor, written out by hand (independent of the codec)."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)
