"""The gateway's one bounded pool of worker threads for caller-sized work.

Whatever a caller can make big — decoding images, decoding large messages, preparing and
post-processing big arrays — runs here instead of on the event loop (where it would stall every
other caller, health checks included). The pool is bounded (``settings.decode_threads``), unlike
asyncio's default executor (``cpu_count + 4`` threads), so the memory such work holds at one
moment is bounded too: at most that many decodes run at once, the others wait their turn holding
only the bytes they arrived with.

One pool per data plane (:attr:`cnnserve.gateway.dataplane.DataPlane.decode_pool`); transports
reach it there.

Images are decoded elsewhere: a batch of them, once the batcher has formed it, goes to an
:class:`ImageDecoder` — by default a few decode *processes* (:class:`DecodeProcesses`), since
Pillow's decode holds this interpreter's lock and would compete with the transports for it.
Their number is bounded (``settings.decode_processes``), and so are the batches waiting for
them: every model's batcher runs one batch at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import TypeVar, cast

import numpy as np

from cnnserve.errors import InvalidInputError, UnavailableError

from .decode_worker import ImageJob, Prepared, WorkerFailure, prepare_images

T = TypeVar("T")
logger = logging.getLogger(__name__)
#: The program a decode process runs.
WORKER_MODULE = "cnnserve.gateway.decode_worker"
#: A decode process decodes one image at a time: numpy's BLAS needs no thread pool there
#: (one thread per core otherwise, each with its stack).
SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
#: Fewest images a decode process gets when a batch is shared among processes: below this
#: the round trip costs more than the decode it would save (a digit PNG takes ~0.25 ms).
MIN_PROCESS_ITEMS = 4

#: Worker threads' name prefix (seen in py-spy, gdb, /proc/<pid>/task/*/comm).
THREAD_NAME_PREFIX = "cnnserve-decode"


class DecodePool:
    """At most ``threads`` functions run at once in worker threads; see the module docstring."""

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"a decode pool needs at least one thread, got {threads}")
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in a worker thread (with the caller's context variables, as
        :func:`asyncio.to_thread`), once a thread is free."""
        if self._executor is None:
            # Made on first use, so a pool closed by a stopped data plane serves again when
            # the data plane starts again.
            self._executor = ThreadPoolExecutor(self.threads, THREAD_NAME_PREFIX)
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        """Let the threads end once their current work is done; queued work is dropped."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


class _Worker:
    """One decode process and the connection to it, used by one thread at a time."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._connection: Connection | None = None
        #: Whether a job has been sent and its answer not received yet.
        self.holding = False

    @property
    def pid(self) -> int | None:
        """The process id, while a process is running."""
        return self._process.pid if self._process is not None else None

    def call(self, job: ImageJob) -> object:
        """Send ``job``, wait for its answer; a process that died is replaced first, and one
        that dies holding the job fails that job only (:class:`UnavailableError`)."""
        if self._process is None or self._process.poll() is not None:
            self.stop()
            self._spawn()
        assert self._connection is not None
        try:
            self._connection.send(job)
            self.holding = True
            return self._connection.recv()
        except (EOFError, OSError):
            code = self.stop()
            logger.error("image decoding process died (exit code %s) decoding a batch", code)
            raise UnavailableError(
                f"the process decoding this batch's images died (exit code {code}); retry"
            ) from None
        finally:
            self.holding = False

    def kill(self) -> None:
        """End the process now (a thread waiting on it gets its answer: it died)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()

    def stop(self) -> int | None:
        """End the process, reap it, close the connection; its exit code."""
        code = None
        if self._process is not None:
            self.kill()
            code = self._process.wait()
            self._process = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        return code

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            # A fresh interpreter (not a fork of this one, its threads and its loaded
            # models): it imports the decoding steps only.
            self._process = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env={**os.environ, **SINGLE_THREADED},
            )
            self._connection = Connection(ours.detach())


class DecodeProcesses:
    """At most ``processes`` batches of images decoded at once, each in a process of its own;
    see :class:`ImageDecoder`."""

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"decode processes need at least one process, got {processes}")
        self.processes = processes
        self._workers = [_Worker() for _ in range(processes)]
        # As many threads as processes, so a thread always finds an idle process; the
        # threads wait on the processes' pipes without holding the interpreter lock.
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for worker in self._workers:
            self._idle.put(worker)
        self._executor: ThreadPoolExecutor | None = None

    def pids(self) -> list[int]:
        """Ids of the decode processes running now (started on first use)."""
        return [pid for worker in self._workers if (pid := worker.pid) is not None]

    def holding(self) -> list[int]:
        """Ids of the decode processes holding a job now (sent, not answered yet)."""
        return [w.pid for w in self._workers if w.holding and w.pid is not None]

    async def run(self, job: ImageJob) -> object:
        """``job``'s answer from a decode process (:func:`.decode_worker.serve`), once one is
        free; :class:`UnavailableError` when the process died holding it."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.processes, f"{THREAD_NAME_PREFIX}-ipc")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, job)

    def _call(self, job: ImageJob) -> object:
        worker = self._idle.get()
        try:
            return worker.call(job)
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        """End every process; a batch being decoded fails (UNAVAILABLE), queued ones are
        dropped. A later :meth:`run` starts processes again."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        for worker in self._workers:
            # A busy worker's thread reaps it and closes its connection when the kill ends
            # its wait; an idle one is stopped here.
            worker.kill()
        idle = []
        with contextlib.suppress(queue.Empty):
            while True:
                idle.append(self._idle.get_nowait())
        for worker in idle:
            worker.stop()
            self._idle.put(worker)


class ImageDecoder:
    """Turns a batch of encoded images into network input beside the event loop: in
    ``processes`` decode processes (:class:`DecodeProcesses`: no interpreter lock shared with
    the gateway's transports), or, with ``processes = 0``, in the decode threads."""

    def __init__(self, processes: int, threads: DecodePool) -> None:
        self._threads = threads
        self._processes = DecodeProcesses(processes) if processes > 0 else None

    def pids(self) -> list[int]:
        """Ids of the decode processes running now (none with ``processes = 0``)."""
        return self._processes.pids() if self._processes is not None else []

    def holding(self) -> list[int]:
        """Ids of the decode processes decoding a batch now."""
        return self._processes.holding() if self._processes is not None else []

    async def prepare(self, job: ImageJob) -> Prepared:
        """``job``'s rows and failed items (:func:`.decode_worker.prepare_images`).

        A batch of at least ``2 × MIN_PROCESS_ITEMS`` images is shared among the processes,
        one part each, so its decode takes a fraction of the time the model waits for it.
        """
        if self._processes is None:
            return await self._threads.run(prepare_images, job)
        count = len(job.images)
        parts = max(1, min(self._processes.processes, count // MIN_PROCESS_ITEMS))
        bounds = [count * i // parts for i in range(parts + 1)]
        answers = await asyncio.gather(
            *(
                self._processes.run(dataclasses.replace(job, images=job.images[start:stop]))
                for start, stop in itertools.pairwise(bounds)
            )
        )
        rows: list[np.ndarray] = []
        failures: dict[int, InvalidInputError] = {}
        for start, answer in zip(bounds, answers, strict=False):
            if isinstance(answer, InvalidInputError):
                raise answer
            if isinstance(answer, WorkerFailure):
                raise RuntimeError(f"decoding a batch of images failed: {answer.description}")
            part_rows, part_failures = cast(Prepared, answer)
            rows.append(part_rows)
            failures.update({start + index: exc for index, exc in part_failures.items()})
        return (rows[0] if len(rows) == 1 else np.concatenate(rows)), failures

    def close(self) -> None:
        """End the decode processes (the threads are the data plane's to close)."""
        if self._processes is not None:
            self._processes.close()
