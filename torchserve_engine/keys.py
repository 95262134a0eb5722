"""Where the gateway finds the inference key of each TorchServe replica it calls.

TorchServe 0.12 draws a random key per server and writes it to its ``key_file.json``; it
cannot be told which key to use. So with several replicas the gateway needs one key per
replica: each replica publishes its key into a shared directory under a file named after the
address the gateway reaches it at (:func:`key_file_name`), and :class:`KeyDir` looks it up per
address. One local server needs no directory: :class:`KeyFile` reads its ``key_file.json``.

Both re-read a file only when it changed (a restarted TorchServe writes a new key, and so
does a renewal: :func:`cnnserve.torchserve_engine.process.renew_keys`), so a key is picked up
without restarting the gateway; ``fresh=True`` reads it again regardless (a key just refused,
whose file may have been rewritten within the file system's timestamp granularity). Keys are
never logged.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

from cnnserve.errors import UnavailableError

KeyKind = Literal["inference", "management"]
#: The keys that expire, in the order they are renewed.
EXPIRING: tuple[KeyKind, ...] = ("inference", "management")


def read_key(key_file: Path, kind: KeyKind | Literal["API"]) -> str:
    """One key from TorchServe's ``key_file.json`` (written at start when tokens are on):
    ``inference``, ``management`` or ``API`` (the token API's, which never expires)."""
    try:
        keys = json.loads(key_file.read_text())
        return str(keys[kind]["key"])
    except FileNotFoundError:
        raise UnavailableError(
            f"TorchServe key file {key_file} not found; is TorchServe running with token "
            "authorization (cnnserve torchserve start)?"
        ) from None
    except (ValueError, KeyError, TypeError):
        raise UnavailableError(f"TorchServe key file {key_file} has no {kind} key") from None


def key_expiry(key_file: Path, kind: KeyKind) -> datetime:
    """When the ``kind`` key in TorchServe's ``key_file.json`` expires (its ``expiration
    time``, an ISO-8601 instant in UTC; nanoseconds are cut to microseconds)."""
    try:
        keys = json.loads(key_file.read_text())
        return datetime.fromisoformat(str(keys[kind]["expiration time"]))
    except FileNotFoundError:
        raise UnavailableError(f"TorchServe key file {key_file} not found") from None
    except (ValueError, KeyError, TypeError):
        raise UnavailableError(f"TorchServe key file {key_file} has no {kind} expiry") from None


def read_inference_key(key_file: Path) -> str:
    """The inference key from TorchServe's ``key_file.json``."""
    return read_key(key_file, "inference")


class KeyStore(Protocol):
    """The inference key to send to the TorchServe at an address (``None``: tokens off)."""

    def key_for(self, host: str, port: int, fresh: bool = False) -> str | None:
        """The key for ``host:port`` (``fresh``: read again even if its file seems unchanged);
        raises :class:`UnavailableError` when it is unknown."""
        ...


def key_file_name(host: str, port: int) -> str:
    """The file a replica reached at ``host:port`` publishes its key in: ``<host>_<port>.json``."""
    # IPv6 addresses carry colons, which some volume drivers do not allow in file names.
    return f"{host.replace(':', '-')}_{port}.json"


class FixedKey:
    """The same key (or none, when token authorization is off) for every address."""

    def __init__(self, key: str | None) -> None:
        self._key = key

    def key_for(self, host: str, port: int, fresh: bool = False) -> str | None:
        """The one key, whatever the address."""
        return self._key


class _CachedFile:
    """A key file's inference key, read again only when the file's modification time moved."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: int | None = None
        self._key = ""

    def key(self, fresh: bool = False) -> str:
        """The inference key in the file (``fresh``: read even if the modification time did
        not move); :class:`UnavailableError` if missing or malformed."""
        try:
            stamp = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if fresh or stamp is None or stamp != self._stamp:
            self._key = read_inference_key(self.path)
            self._stamp = stamp
        return self._key


class KeyFile:
    """One TorchServe's ``key_file.json``: the same key for every address (one server)."""

    def __init__(self, path: Path) -> None:
        self._file = _CachedFile(path)

    def key_for(self, host: str, port: int, fresh: bool = False) -> str | None:
        """The key in the file, re-read when TorchServe wrote a new one."""
        return self._file.key(fresh)


class KeyDir:
    """The directory every replica publishes its key in, one file per address."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[tuple[str, int], _CachedFile] = {}

    def key_for(self, host: str, port: int, fresh: bool = False) -> str | None:
        """The key the replica at ``host:port`` published (re-read when it changed)."""
        cached = self._files.get((host, port))
        if cached is None:
            cached = _CachedFile(self.directory / key_file_name(host, port))
            self._files[(host, port)] = cached
        try:
            return cached.key(fresh)
        except UnavailableError:
            raise UnavailableError(
                f"no inference key published for TorchServe at {host}:{port} (expected "
                f"{cached.path}); has that replica finished starting?"
            ) from None


def key_store(key_file: Path | None, key_dir: Path | None) -> KeyStore:
    """Keys from ``key_dir`` per replica, else from ``key_file``; none when both are ``None``."""
    if key_dir is not None:
        return KeyDir(key_dir)
    if key_file is not None:
        return KeyFile(key_file)
    return FixedKey(None)
