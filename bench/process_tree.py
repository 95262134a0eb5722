"""What a server's processes together use: resident memory and CPU time, summed over a process
and its children (a gateway's frontends and decode processes, TorchServe's JVM and workers)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import psutil


def resident_bytes(processes: Iterable[psutil.Process]) -> int:
    """Resident memory of ``processes`` together (a process that has exited counts 0)."""
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


def cpu_seconds(processes: Iterable[psutil.Process]) -> float:
    """User and system CPU time ``processes`` have used so far, together. Two readings around
    a load run give what the run cost them (a process that exits in between takes its time
    with it)."""
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total
