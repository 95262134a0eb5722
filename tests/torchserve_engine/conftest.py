"""A TorchServe whose keys expire within seconds, shared by this package's renewal tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cnnserve.torchserve_engine.process import ServerInfo
from tests.conftest import running_torchserve, torchserve_settings
from tests.support import starts_torchserve

from .renewal import SHORT_EXPIRATION_MIN


@pytest.fixture(scope="package")
@starts_torchserve
def short_lived_keys(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerInfo]:
    """A real TorchServe (tokens on) serving the default repository's TorchScript archives,
    its keys valid :data:`~.renewal.SHORT_EXPIRATION_MIN` minutes. Nothing renews them
    unless a test does: each test renews or expires them as it needs."""
    store = tmp_path_factory.mktemp("short_lived_keys")
    settings = torchserve_settings(store).model_copy(
        update={"torchserve_token_expiration_min": SHORT_EXPIRATION_MIN}
    )
    with running_torchserve(model_repository, store, settings) as server:
        yield server
