"""A stand-in ``pynvml`` with NVML's names and types: the one fake of the GPU metrics tests
(no GPU here; a GPU host runs ``cnnserve gpu-check``)."""

from __future__ import annotations

import types
from dataclasses import dataclass

GIB = 1 << 30


class NVMLError(Exception):
    """pynvml's base error."""


@dataclass
class Utilization:
    gpu: int  # percent, as NVML's nvmlUtilization_t
    memory: int


@dataclass
class Memory:
    total: int
    free: int
    used: int


def fake_nvml(
    devices: list[tuple[str, int, int, int]], init_fails: bool = False
) -> types.ModuleType:
    """A ``pynvml`` whose devices are ``(name, utilization %, used bytes, total bytes)``;
    a device whose name is ``"lost"`` raises NVMLError as one fallen off the bus does."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = NVMLError  # type: ignore[attr-defined]

    def init() -> None:
        if init_fails:
            raise NVMLError("Driver Not Loaded")

    def device(index: int) -> tuple[str, int, int, int]:
        if devices[index][0] == "lost":
            raise NVMLError("GPU is lost")
        return devices[index]

    nvml.nvmlInit = init  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetName = lambda i: device(i)[0].encode()  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUUID = lambda i: f"GPU-{i:04d}"  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUtilizationRates = lambda i: Utilization(device(i)[1], 0)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda i: Memory(
        device(i)[3], device(i)[3] - device(i)[2], device(i)[2]
    )  # type: ignore[attr-defined]
    return nvml
