"""A real TorchServe for a benchmark run: behind the gateway, or alone with its own batching.

Behind the gateway TorchServe keeps ``batchSize`` 1 (the gateway batches already). For the
baseline "TorchServe alone" it batches itself: ``batchSize`` and ``maxBatchDelay`` set to the
gateway's own batching settings, so the two batchers get the same budget.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from cnnserve.export.repository import ensure_default_repository
from cnnserve.settings import Settings
from cnnserve.torchserve_engine.archive import archive_repository
from cnnserve.torchserve_engine.process import (
    ServerInfo,
    loopback_settings,
    start,
    stop,
)

from .gateway_process import free_ports
from .process_tree import cpu_seconds, resident_bytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchServeRun:
    """A started TorchServe and how to reach it."""

    settings: Settings
    server: ServerInfo
    batch_size: int
    max_batch_delay_ms: int
    workers: int = 1

    @property
    def rest_target(self) -> str:
        """``host:port`` of the REST inference API."""
        return self.server.inference_url.removeprefix("http://")

    @property
    def inference_key(self) -> str | None:
        """The key inference calls must carry (``None`` without token authorization)."""
        return self.server.key("inference")

    def gateway_env(self) -> dict[str, str]:
        """``CNNSERVE_*`` variables pointing a gateway's torchserve backend at this server."""
        env = {
            "CNNSERVE_TORCHSERVE_GRPC_TARGET": self.server.grpc_target,
            "CNNSERVE_MODEL_STORE_DIR": str(self.server.model_store),
        }
        if self.server.key_file is not None:
            env["CNNSERVE_TORCHSERVE_KEY_FILE"] = str(self.server.key_file)
        return env

    def processes(self) -> list[psutil.Process]:
        """The JVM and its Python workers (none once the JVM has exited)."""
        try:
            jvm = psutil.Process(self.server.pid)
            return [jvm, *jvm.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_bytes(self) -> int:
        """Resident memory of the JVM and its Python workers together."""
        return resident_bytes(self.processes())

    def cpu_seconds(self) -> float:
        """CPU time the JVM and its workers have used so far, together."""
        return cpu_seconds(self.processes())


@contextlib.contextmanager
def running_torchserve(
    work_dir: Path,
    batch_size: int,
    max_batch_delay_ms: int,
    token_auth: bool = True,
    workers: int = 1,
) -> Iterator[TorchServeRun]:
    """Archive the demo models (TorchScript, from a repository in ``work_dir`` exported from
    the committed weights), start TorchServe on free ports, stop it on exit.

    ``token_auth=False`` for replicas behind one gateway channel (each would draw its own key).
    ``workers``: worker processes per model.
    """
    store = work_dir / f"model_store-b{batch_size}-w{workers}"
    settings = loopback_settings(
        store,
        free_ports(6),
        token_auth,
        torchserve_batch_size=batch_size,
        torchserve_max_batch_delay_ms=max_batch_delay_ms,
        torchserve_workers_per_model=workers,
    )
    repository = work_dir / "repository"
    ensure_default_repository(repository)
    archive_repository(repository, store, settings, "torchscript", half=False)
    logger.info("starting TorchServe (batchSize %d, maxBatchDelay %d ms, %d workers per model)",
                batch_size, max_batch_delay_ms, workers)  # fmt: skip
    server = start(settings, store)
    try:
        yield TorchServeRun(settings, server, batch_size, max_batch_delay_ms, workers)
    finally:
        stop(store)
