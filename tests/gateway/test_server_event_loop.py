"""The gateway runs on either event loop ``settings.event_loop`` names (uvloop by default)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import uvloop

from cnnserve.client.inference import connect
from tests.gateway.harness import gateway_settings, running_gateway


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_gateway_serves_on_each_event_loop(model_repository: Path, event_loop: str) -> None:
    settings = gateway_settings(model_repository, event_loop=event_loop)

    async def main() -> tuple[str, list[str]]:
        loop_module = type(asyncio.get_running_loop()).__module__
        async with running_gateway(settings) as gateway:
            # The blocking client runs in a thread, so the loop goes on serving meanwhile.
            labels = await asyncio.to_thread(_classify_blank, gateway.grpc_port)
        return loop_module, labels

    runner = uvloop.run if event_loop == "uvloop" else asyncio.run
    loop_module, labels = runner(main())
    assert loop_module.startswith("uvloop") == (event_loop == "uvloop")
    assert len(labels) == 2


def _classify_blank(port: int) -> list[str]:
    with connect("127.0.0.1", port) as client:
        result = client.infer("convnet", {"pixels": np.zeros((2, 3, 28, 28), np.uint8)})
    return [str(row[0]) for row in result["labels"]]
