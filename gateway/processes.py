"""Several gateway processes on one set of ports (``settings.gateway_processes`` > 1).

A Python process serves RPCs on about one core; on a many-core host (a GPU server) the RPC
layer, not the model, is the wall. This supervisor starts N gateway processes that bind the
same gRPC and HTTP ports with ``SO_REUSEPORT`` — the kernel spreads incoming connections over
them — each with its own batchers and backend. Process 0 also serves the metrics port, with
every process's metrics summed (prometheus_client's multiprocess mode, files in a private
temporary directory).

With ``shared_batcher`` (the default) one more process, the batching process
(:mod:`.batching_process`), owns the backend and every model version's batcher; the N gateway
processes are frontends that feed it over a Unix-domain socket in a private (0700) directory
(:mod:`.remote_backend`), so models load once and batches are as full as one process would
form them (docs/scaling.md). It starts first; the frontends start once it listens, and on a
stop they drain first, then it does. Without ``shared_batcher`` each process batches only its
own share of the traffic, so batches are smaller than one process would form
(docs/benchmarks.md measures it).

Signals: the workers run in their own process group, so a terminal's Ctrl-C reaches the
supervisor only, which sends each worker one SIGTERM; every worker then drains as a single
gateway does. Workers also get SIGTERM when the supervisor dies (Linux), so none outlives it
holding the ports. When a worker (or the batching process) exits on its own, the others are
stopped too.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType

from cnnserve.logs import setup_logging
from cnnserve.settings import Settings

from .batching_process import serve_batching, socket_file
from .metrics import MULTIPROCESS_DIR_ENV

logger = logging.getLogger(__name__)

#: ``serve_forever(settings, serve_metrics)``: how a worker runs its gateway.
Serve = Callable[[Settings, bool], None]
#: Seconds past the drain grace a worker gets before it is killed.
STOP_MARGIN_S = 10.0
_PR_SET_PDEATHSIG = 1

#: Seconds the supervisor waits for the batching process to listen.
BATCHING_START_TIMEOUT_S = 120.0


@dataclass
class _Role:
    """Set in a worker process: its gateway must not start workers of its own; a frontend
    of a shared batcher knows its socket."""

    worker: bool = False
    batching_socket: str | None = None


_role = _Role()


def in_worker() -> bool:
    """Whether this process is one of a supervisor's gateway workers."""
    return _role.worker


def batching_socket() -> str | None:
    """In a frontend of a shared batcher: the batching process's socket; else ``None``."""
    return _role.batching_socket


def run_processes(settings: Settings, serve: Serve) -> None:
    """Run ``settings.gateway_processes`` workers until SIGTERM/SIGINT or one of them exits.

    Raises ``ValueError`` when a port is 0 (each worker would bind its own) and
    ``RuntimeError`` when a worker exited by itself.
    """
    if 0 in (settings.grpc_port, settings.http_port, settings.metrics_port):
        raise ValueError("gateway_processes > 1 needs fixed gRPC, HTTP and metrics ports, not 0")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop.set())
    with contextlib.ExitStack() as stack:
        metrics_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="cnnserve-metrics-"))
        # Inherited by the spawned workers before they import prometheus_client.
        os.environ[MULTIPROCESS_DIR_ENV] = metrics_dir
        context = multiprocessing.get_context("spawn")
        batching: list[BaseProcess] = []
        socket_path: str | None = None
        if settings.shared_batcher:
            # mkdtemp makes the directory 0700: only this user reaches the socket.
            socket_path = socket_file(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="cnnserve-batching-"))
            )
            batching.append(_start_batching(context, settings, socket_path, stop))
        workers = [
            context.Process(
                target=_worker_main,
                args=(settings, index == 0, serve, socket_path),
                name=f"gateway-{index}",
            )
            for index in range(settings.gateway_processes)
        ]
        if all(b.is_alive() for b in batching) and not stop.is_set():
            for worker in workers:
                worker.start()
            logger.info(
                "%d gateway processes (pids %s) share gRPC %d and HTTP %d%s",
                len(workers),
                ", ".join(str(w.pid) for w in workers),
                settings.grpc_port,
                settings.http_port,
                f", fed to one batching process (pid {batching[0].pid})" if batching else "",
            )
            everyone = workers + batching
            while not stop.is_set() and all(w.is_alive() for w in everyone):
                stop.wait(0.5)
        started = [w for w in workers if w.pid is not None]
        exited = [w for w in started + batching if not w.is_alive()]
        # Frontends drain first: their calls in flight still need the batching process.
        _stop_all(started, settings.drain_grace_s + STOP_MARGIN_S)
        _stop_all(batching, settings.drain_grace_s + STOP_MARGIN_S)
    if not stop.is_set():
        codes = ", ".join(f"{w.name} exited with {w.exitcode}" for w in exited)
        raise RuntimeError(f"a gateway process stopped by itself ({codes}); stopped the others")


def _stop_all(workers: Sequence[BaseProcess], timeout_s: float) -> None:
    """One SIGTERM each (they drain), then wait; kill what outlives the timeout."""
    for worker in workers:
        if worker.is_alive() and worker.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
    for worker in workers:
        worker.join(timeout_s)
        if worker.is_alive():
            logger.warning("%s did not stop within %.0f s; killing it", worker.name, timeout_s)
            worker.kill()
            worker.join()


def _start_batching(
    context: SpawnContext, settings: Settings, socket_path: str, stop: threading.Event
) -> BaseProcess:
    """Start the batching process and wait until it listens (or dies, or a stop comes)."""
    listening = context.Event()
    process = context.Process(
        target=_batching_main, args=(settings, socket_path, listening), name="batching"
    )
    process.start()
    give_up_at = time.monotonic() + BATCHING_START_TIMEOUT_S
    while not listening.wait(0.1):
        if not process.is_alive() or stop.is_set() or time.monotonic() > give_up_at:
            break
    return process


def _setup_worker(settings: Settings) -> None:
    _role.worker = True
    os.setpgrp()  # a terminal's Ctrl-C goes to the supervisor, which sends one SIGTERM
    _die_with_parent()
    # A spawned process starts with no logging: the supervisor's set-up, lines with the pid.
    setup_logging(settings.log_level, settings.log_format, worker=True)


def _worker_main(
    settings: Settings, serve_metrics: bool, serve: Serve, socket_path: str | None = None
) -> None:
    _setup_worker(settings)
    _role.batching_socket = socket_path
    serve(settings, serve_metrics)


def _batching_main(settings: Settings, socket_path: str, listening: EventType) -> None:
    _setup_worker(settings)
    serve_batching(settings, socket_path, listening.set)


def _die_with_parent() -> None:
    """Ask Linux for a SIGTERM when the supervisor dies (elsewhere: not available)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
