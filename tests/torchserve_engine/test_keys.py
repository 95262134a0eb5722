"""Inference keys per replica: the shared key directory, one server's key file, no tokens."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cnnserve.errors import UnavailableError
from cnnserve.torchserve_engine.keys import (
    FixedKey,
    KeyDir,
    KeyFile,
    key_expiry,
    key_file_name,
    key_store,
    read_key,
)


def write_key(path: Path, key: str, bump_ns: int = 0) -> None:
    """A key file as a replica publishes it; ``bump_ns`` moves its mtime on (coarse clocks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"inference": {"key": key}}))
    if bump_ns:
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + bump_ns))


def test_file_names_follow_the_address() -> None:
    assert key_file_name("10.0.3.7", 7070) == "10.0.3.7_7070.json"
    assert key_file_name("fd00::5", 7070) == "fd00--5_7070.json"


def test_a_key_dir_gives_each_replica_its_own_key(tmp_path: Path) -> None:
    keys = KeyDir(tmp_path)
    write_key(tmp_path / "10.0.0.1_7070.json", "one")
    write_key(tmp_path / "10.0.0.2_7070.json", "two")
    assert keys.key_for("10.0.0.1", 7070) == "one"
    assert keys.key_for("10.0.0.2", 7070) == "two"
    with pytest.raises(UnavailableError, match=r"no inference key published for TorchServe at "):
        keys.key_for("10.0.0.3", 7070)
    # A replica that publishes later (it was still starting) is found then.
    write_key(tmp_path / "10.0.0.3_7070.json", "three")
    assert keys.key_for("10.0.0.3", 7070) == "three"


def test_a_restarted_replicas_new_key_is_read_again(tmp_path: Path) -> None:
    keys = KeyDir(tmp_path)
    path = tmp_path / key_file_name("10.0.0.1", 7070)
    write_key(path, "before")
    assert keys.key_for("10.0.0.1", 7070) == "before"
    write_key(path, "after", bump_ns=10**9)
    assert keys.key_for("10.0.0.1", 7070) == "after"


def test_one_key_file_serves_every_address(tmp_path: Path) -> None:
    path = tmp_path / "key_file.json"
    keys = KeyFile(path)
    with pytest.raises(UnavailableError, match=r"key_file\.json not found"):
        keys.key_for("127.0.0.1", 7070)
    write_key(path, "k1")
    assert keys.key_for("127.0.0.1", 7070) == keys.key_for("127.0.0.1", 7071) == "k1"
    write_key(path, "k2", bump_ns=10**9)
    assert keys.key_for("127.0.0.1", 7070) == "k2"


def test_the_store_follows_the_settings(tmp_path: Path) -> None:
    write_key(tmp_path / "dir" / "127.0.0.1_1.json", "from-dir")
    write_key(tmp_path / "key_file.json", "from-file")
    both = key_store(tmp_path / "key_file.json", tmp_path / "dir")
    assert both.key_for("127.0.0.1", 1) == "from-dir"
    assert key_store(tmp_path / "key_file.json", None).key_for("127.0.0.1", 1) == "from-file"
    assert key_store(None, None).key_for("127.0.0.1", 1) is None
    assert FixedKey("k").key_for("anywhere", 2) == "k"


def test_expiry_is_read_as_torchserve_writes_it(tmp_path: Path) -> None:
    """TorchServe writes Java ``Instant``s, with nanoseconds; Python keeps microseconds."""
    path = tmp_path / "key_file.json"
    path.write_text(
        json.dumps(
            {
                "management": {"key": "m", "expiration time": "2026-11-30T19:01:05Z"},
                "inference": {"key": "i", "expiration time": "2026-11-30T19:01:05.756811537Z"},
                "API": {"key": "a"},
            }
        )
    )
    assert key_expiry(path, "inference") == datetime(2026, 11, 30, 19, 1, 5, 756811, UTC)
    assert key_expiry(path, "management") == datetime(2026, 11, 30, 19, 1, 5, tzinfo=UTC)
    assert read_key(path, "API") == "a"
    write_key(path, "published copies carry no expiry")
    with pytest.raises(UnavailableError, match="has no inference expiry"):
        key_expiry(path, "inference")


def test_a_fresh_read_sees_a_key_rewritten_within_one_timestamp(tmp_path: Path) -> None:
    """A file rewritten within the file system's timestamp granularity looks unchanged; a key
    just refused is read again all the same."""
    path = tmp_path / "key_file.json"
    keys = KeyFile(path)
    write_key(path, "old")
    stamp = path.stat().st_mtime_ns
    assert keys.key_for("127.0.0.1", 7070) == "old"
    write_key(path, "new")
    os.utime(path, ns=(stamp, stamp))
    assert keys.key_for("127.0.0.1", 7070) == "old"
    assert keys.key_for("127.0.0.1", 7070, fresh=True) == "new"
    directory = KeyDir(tmp_path)
    write_key(tmp_path / "10.0.0.1_7070.json", "old")
    assert directory.key_for("10.0.0.1", 7070) == "old"
    stamp = (tmp_path / "10.0.0.1_7070.json").stat().st_mtime_ns
    write_key(tmp_path / "10.0.0.1_7070.json", "new")
    os.utime(tmp_path / "10.0.0.1_7070.json", ns=(stamp, stamp))
    assert directory.key_for("10.0.0.1", 7070, fresh=True) == "new"
