"""Real ``cnnserve serve`` processes: one for the bad-input fuzzers (gRPC, HTTP and OpenAPI),
one for the browser tests of the pages; an HTTP client and a gRPC stub for a module's
in-process gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio

from cnnserve.gateway.server import Gateway
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from tests.gateway.bad_input import Clients, assert_still_serving
from tests.support import GatewayProcess, gateway_process


@pytest_asyncio.fixture(loop_scope="module")
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the real port of the module's in-process ``gateway`` (modules whose
    gateway is a process define their own)."""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=60
    ) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module")
async def stub(gateway: Gateway) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    """An inference stub on a fresh channel to the module's in-process ``gateway``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


#: The fuzzed gateway's limits: small, so the fuzzers reach them with small requests.
FUZZ_MAX_MESSAGE_BYTES = 1 << 20
FUZZ_MAX_ITEMS = 8


@pytest.fixture(scope="session")
def fuzz_gateway(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """``cnnserve serve --backend onnxruntime`` in its own process: a crash there is seen
    as a dead process, not hidden inside the test's own event loop."""
    log = tmp_path_factory.mktemp("fuzz_gateway") / "gateway.log"
    with gateway_process(
        "onnxruntime",
        log,
        model_repository=model_repository,
        device="cpu",
        max_message_bytes=FUZZ_MAX_MESSAGE_BYTES,
        max_items_per_request=FUZZ_MAX_ITEMS,
        inference_threads=1,
    ) as gateway:
        yield gateway
    # Any traceback means an exception escaped the error table somewhere.
    text = gateway.output()
    assert "Traceback" not in text, text[-4000:]


@pytest.fixture(scope="session")
def page_gateway(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """``cnnserve serve --backend onnxruntime`` in its own process, at its defaults, for the
    browser tests: Selenium's calls block, so the gateway cannot share the test's loop."""
    log = tmp_path_factory.mktemp("page_gateway") / "gateway.log"
    with gateway_process(
        "onnxruntime", log, model_repository=model_repository, device="cpu"
    ) as gateway:
        yield gateway
    assert "Traceback" not in gateway.output(), gateway.output()[-4000:]


@pytest.fixture(scope="session")
def fuzz_clients(fuzz_gateway: GatewayProcess) -> Iterator[Clients]:
    """A gRPC stub (client-side limits far above the server's) and an HTTP client."""
    big = 64 << 20
    options = [("grpc.max_send_message_length", big), ("grpc.max_receive_message_length", big)]
    with (
        grpc.insecure_channel(fuzz_gateway.grpc_target, options=options) as channel,
        httpx.Client(base_url=f"http://127.0.0.1:{fuzz_gateway.http_port}") as http,
    ):
        yield Clients(pb_grpc.GRPCInferenceServiceStub(channel), http)  # type: ignore[no-untyped-call]


@pytest.fixture
def serving(fuzz_clients: Clients, fuzz_gateway: GatewayProcess) -> Callable[[], None]:
    """Call after a test's examples: checks the gateway still serves (see above)."""
    before = fuzz_gateway.rss_bytes()
    return lambda: assert_still_serving(fuzz_clients, fuzz_gateway, before)
