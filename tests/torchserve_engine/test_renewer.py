"""The detached key renewer (``torchserve_engine/renewer.py``) against a real TorchServe.

The command line's own path (``cnnserve torchserve start`` spawning it, ``stop`` ending it) is
tested in ``tests/cnnserve/test_cli_torchserve.py``; here: what it does when renewing fails.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cnnserve.torchserve_engine.process import RENEWER_LOG, ServerInfo, start, stop
from cnnserve.torchserve_engine.renewer import CHECK_INTERVAL_S, spawn
from tests.conftest import torchserve_settings
from tests.support import wait_until

#: Keys of 12 s, renewed with 3 s left at the default fraction.
SHORT_EXPIRATION_MIN = 0.2
FRACTION = 0.25


@pytest.fixture
def empty_torchserve(tmp_path: Path) -> Iterator[ServerInfo]:
    """A real TorchServe with no model (quick to start), keys of 12 s, stopped on exit."""
    store = tmp_path / "store"
    store.mkdir()
    settings = torchserve_settings(store).model_copy(
        update={"torchserve_token_expiration_min": SHORT_EXPIRATION_MIN}
    )
    server = start(settings, store)
    try:
        yield server
    finally:
        stop(store)


def _log(server: ServerInfo) -> str:
    return (server.run_dir / "logs" / RENEWER_LOG).read_text()


@pytest.mark.torchserve
def test_a_failing_renewal_is_logged_once_and_retried_until_it_succeeds(
    empty_torchserve: ServerInfo,
) -> None:
    key_file = empty_torchserve.key_file
    assert key_file is not None
    saved = key_file.read_text()
    pid = spawn(empty_torchserve, FRACTION)
    assert pid is not None
    renewer = psutil.Process(pid)
    # The key file gone (as a stop removes it): no expiry to read, every check fails.
    key_file.unlink()
    wait_until(lambda: "cannot renew TorchServe's keys" in _log(empty_torchserve), 10, "a failure")
    time.sleep(3 * CHECK_INTERVAL_S)  # three more failing checks
    assert renewer.is_running() and renewer.status() != psutil.STATUS_ZOMBIE
    assert _log(empty_torchserve).count("WARNING") == 1  # once per failing spell
    # Back (its keys expired or nearly so by now): the renewer draws new ones.
    key_file.write_text(saved)
    wait_until(lambda: "renewed TorchServe's" in _log(empty_torchserve), 20, "a renewal")
    assert key_file.read_text() != saved


def test_nothing_to_renew_spawns_nothing(tmp_path: Path) -> None:
    server = ServerInfo(
        pid=1,
        run_dir=tmp_path,
        tmp_dir=tmp_path,
        model_store=tmp_path,
        models=(),
        inference_url="http://127.0.0.1:1",
        management_url="http://127.0.0.1:2",
        metrics_url="http://127.0.0.1:3",
        grpc_target="127.0.0.1:4",
        key_file=tmp_path / "key_file.json",
        token_lifetime_s=60.0,
    )
    assert spawn(server, 0.0) is None  # renewal off
    assert (
        spawn(dataclasses.replace(server, key_file=None, token_lifetime_s=None), FRACTION) is None
    )
    assert list(tmp_path.iterdir()) == []  # no pid file, no log
