"""The in-process backends run the real exported artifacts and agree with each other."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from cnnserve.errors import UnavailableError
from cnnserve.gateway.backends import Backend, InProcessBackend, create_backend
from cnnserve.settings import Settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

PARITY_TOLERANCE = 1e-4


def _batch(n: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, 3, height, width)).astype(np.float32)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backends(artifacts_dir: Path) -> AsyncIterator[dict[str, Backend]]:
    """Both in-process backends, started on the CPU, as ``cnnserve serve`` builds them."""
    started: dict[str, Backend] = {}
    for name in ("onnxruntime", "torchscript"):
        backend = create_backend(Settings(backend=name, artifacts_dir=artifacts_dir, device="cpu"))
        await backend.start()
        started[name] = backend
    yield started
    for backend in started.values():
        await backend.close()


async def test_platforms_are_named_as_triton_names_them(backends: dict[str, Backend]) -> None:
    assert backends["onnxruntime"].describe() == "onnxruntime_onnx"
    assert backends["torchscript"].describe() == "pytorch_libtorch"


@pytest.mark.parametrize("model", ["convnet", "fcn"])
async def test_ready_runs_a_probe(backends: dict[str, Backend], model: str) -> None:
    for backend in backends.values():
        assert await backend.ready(model)


async def test_convnet_parity_on_uneven_batches(backends: dict[str, Backend]) -> None:
    for n in (2, 3, 1):
        x = _batch(n, 28, 28, seed=n)
        ort = await backends["onnxruntime"].infer_batch("convnet", x)
        ts = await backends["torchscript"].infer_batch("convnet", x)
        assert ort.shape == ts.shape == (n, 10)
        assert ort.dtype == ts.dtype == np.float32
        assert np.abs(ort - ts).max() <= PARITY_TOLERANCE


@pytest.mark.parametrize(("n", "height", "width"), [(2, 7, 7), (3, 28, 45), (1, 64, 64)])
async def test_fcn_parity_at_several_sizes(
    backends: dict[str, Backend], n: int, height: int, width: int
) -> None:
    x = _batch(n, height, width, seed=height * width)
    ort = await backends["onnxruntime"].infer_batch("fcn", x)
    ts = await backends["torchscript"].infer_batch("fcn", x)
    assert ort.shape == ts.shape == (n, 4, height, width)
    assert np.abs(ort - ts).max() <= PARITY_TOLERANCE


async def test_unknown_or_closed_model_is_unavailable(artifacts_dir: Path) -> None:
    backend = InProcessBackend(artifacts_dir, "onnx", "onnxruntime_onnx", models=["convnet"])
    await backend.start()
    assert await backend.ready("convnet")
    assert not await backend.ready("fcn")
    with pytest.raises(UnavailableError, match="fcn is not loaded"):
        await backend.infer_batch("fcn", _batch(1, 7, 7, 0))
    await backend.close()
    assert not await backend.ready("convnet")
    with pytest.raises(UnavailableError, match="convnet is not loaded"):
        await backend.infer_batch("convnet", _batch(1, 28, 28, 0))


async def test_missing_artifact_says_how_to_make_it(tmp_path: Path) -> None:
    backend = create_backend(Settings(backend="torchscript", artifacts_dir=tmp_path))
    with pytest.raises(UnavailableError, match=r"convnet\.pt is missing; run `cnnserve export"):
        await backend.start()
    await backend.close()
