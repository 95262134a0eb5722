"""A draining gateway asks its HTTP clients to move on: a real gateway at the default
settings, a raw keep-alive HTTP/1.1 connection."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.gateway.harness import gateway_settings, running_gateway

pytestmark = pytest.mark.asyncio

REQUEST = b"GET /v2/health/ready HTTP/1.1\r\nhost: gateway\r\n\r\n"


async def test_drain_closes_keep_alive_connections(model_repository: Path) -> None:
    """On a kept-alive connection, the first answer during the drain says
    ``Connection: close`` and the connection is closed after it — before, the client kept
    the connection and got 503 on it until the process exited."""
    async with running_gateway(gateway_settings(model_repository)) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http_port)
        try:
            writer.write(REQUEST)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in head
            await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split()[0]))
            gateway.core.begin_drain()
            writer.write(REQUEST)
            # Closed by the server right after the answer: read() reaches the end at once,
            # well before uvicorn's 5 s keep-alive timeout would close an idle connection.
            answer = await asyncio.wait_for(reader.read(), 2)
        finally:
            writer.close()
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert b"connection: close" in answer.lower(), answer
