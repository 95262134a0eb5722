"""What tests share to run things for real: free ports, waiting until something holds,
processes — a ``cnnserve serve`` gateway above all — started and stopped, and the flag on
fixtures that start TorchServe.

The gateway process and the port picker are the ones the benchmarks use
(:mod:`cnnserve.bench.gateway_process`), so tests and benchmarks start gateways one way.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from cnnserve.bench.gateway_process import GatewayProcess, free_ports, start_gateway
from cnnserve.settings import Settings

__all__ = [
    "GatewayProcess",
    "free_ports",
    "gateway_process",
    "is_torchserve_fixture",
    "starts_torchserve",
    "stop_process",
    "wait_until",
    "wait_until_async",
]

F = TypeVar("F", bound=Callable[..., Any])

#: The attribute :func:`starts_torchserve` sets on a fixture function.
_STARTS_TORCHSERVE = "_cnnserve_starts_torchserve"


def starts_torchserve(fixture: F) -> F:
    """Flag a fixture function (under its ``@pytest.fixture``) as starting TorchServe: every
    test using it, directly or through other fixtures, gets the ``torchserve`` mark
    (tests/conftest.py), so ``-m "not torchserve"`` leaves out each test that needs a JVM."""
    setattr(fixture, _STARTS_TORCHSERVE, True)
    return fixture


def is_torchserve_fixture(function: object) -> bool:
    """Whether :func:`starts_torchserve` flagged ``function``."""
    return getattr(function, _STARTS_TORCHSERVE, False) is True


def _attempts(timeout_s: float, what: str) -> Iterator[None]:
    """One turn per attempt: the first at once, the others while ``timeout_s`` lasts; then
    the failure, naming what was waited for."""
    deadline = time.monotonic() + timeout_s
    yield
    while time.monotonic() < deadline:
        yield
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def wait_until(
    condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1
) -> None:
    """Call ``condition`` until it returns something true; fail naming ``what`` once
    ``timeout_s`` has passed. An exception in ``condition`` (an assertion that a process
    still runs, say) ends the wait at once."""
    for _ in _attempts(timeout_s, what):
        if condition():
            return
        time.sleep(interval_s)


async def wait_until_async(
    condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1
) -> None:
    """:func:`wait_until` inside a test's event loop, which runs on between attempts;
    ``condition`` may be a coroutine function."""
    for _ in _attempts(timeout_s, what):
        met = condition()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return
        await asyncio.sleep(interval_s)


def stop_process(process: subprocess.Popen[Any], timeout_s: float) -> int:
    """SIGTERM, then wait up to ``timeout_s`` for the exit (SIGKILL if it does not come);
    the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def _env_value(value: object) -> str:
    """A setting as a ``CNNSERVE_*`` variable holds it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):  # list settings are read as JSON
        return json.dumps([str(item) for item in value])
    return str(value)


@contextmanager
def gateway_process(
    backend: str,
    log_path: Path,
    ready_timeout_s: float = 120.0,
    ports: tuple[int, int, int] | None = None,
    **settings: object,
) -> Iterator[GatewayProcess]:
    """``cnnserve serve --backend <backend>`` in its own process on free ports (or ``ports``:
    gRPC, HTTP, metrics — a replacement on the ports of the process it replaces), configured
    by ``settings`` (field names of :class:`~cnnserve.settings.Settings`) and nothing else:
    no ``CNNSERVE_*`` variable of this process reaches it. Ready (gRPC ServerReady) when
    entered, its output in ``log_path``; stopped on exit, SIGTERM then SIGKILL if it does
    not drain in time."""
    unknown = sorted(set(settings) - set(Settings.model_fields))
    assert not unknown, f"not settings: {unknown}"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CNNSERVE_")}
    variables = {f"CNNSERVE_{name.upper()}": _env_value(v) for name, v in settings.items()}
    # ``ports`` only when given: tools/memory_probe.py's before-run puts an older package,
    # whose launcher takes no ports, first on the path.
    chosen = {} if ports is None else {"ports": ports}
    gateway = start_gateway(backend, variables, log_path, ready_timeout_s, environ, **chosen)
    try:
        yield gateway
    finally:
        gateway.stop()
