"""Where the gateway finds the inference key of each TorchServe replica it calls.

TorchServe 0.12 draws a random key per server and writes it to its ``key_file.json``; it
cannot be told which key to use. So with several replicas the gateway needs one key per
replica: each replica publishes its key into a shared directory under a file named after the
address the gateway reaches it at (:func:`key_file_name`), and :class:`KeyDir` looks it up per
address. One local server needs no directory: :class:`KeyFile` reads its ``key_file.json``.

Both re-read a file only when it changed (a restarted TorchServe writes a new key), so a key
is picked up without restarting the gateway. Keys are never logged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Protocol

from cnnserve.errors import UnavailableError

KeyKind = Literal["inference", "management"]


def read_key(key_file: Path, kind: KeyKind) -> str:
    """One key from TorchServe's ``key_file.json`` (written at start when tokens are on)."""
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


def read_inference_key(key_file: Path) -> str:
    """The inference key from TorchServe's ``key_file.json``."""
    return read_key(key_file, "inference")


class KeyStore(Protocol):
    """The inference key to send to the TorchServe at an address (``None``: tokens off)."""

    def key_for(self, host: str, port: int) -> str | None:
        """The key for ``host:port``; raises :class:`UnavailableError` when it is unknown."""
        ...


def key_file_name(host: str, port: int) -> str:
    """The file a replica reached at ``host:port`` publishes its key in: ``<host>_<port>.json``."""
    # IPv6 addresses carry colons, which some volume drivers do not allow in file names.
    return f"{host.replace(':', '-')}_{port}.json"


class FixedKey:
    """The same key (or none, when token authorization is off) for every address."""

    def __init__(self, key: str | None) -> None:
        self._key = key

    def key_for(self, host: str, port: int) -> str | None:
        """The one key, whatever the address."""
        return self._key


class _CachedFile:
    """A key file's inference key, read again only when the file's modification time moved."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: int | None = None
        self._key = ""

    def key(self) -> str:
        """The inference key in the file; :class:`UnavailableError` if missing or malformed."""
        try:
            stamp = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if stamp is None or stamp != self._stamp:
            self._key = read_inference_key(self.path)
            self._stamp = stamp
        return self._key


class KeyFile:
    """One TorchServe's ``key_file.json``: the same key for every address (one server)."""

    def __init__(self, path: Path) -> None:
        self._file = _CachedFile(path)

    def key_for(self, host: str, port: int) -> str | None:
        """The key in the file, re-read when TorchServe wrote a new one."""
        return self._file.key()


class KeyDir:
    """The directory every replica publishes its key in, one file per address."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[tuple[str, int], _CachedFile] = {}

    def key_for(self, host: str, port: int) -> str | None:
        """The key the replica at ``host:port`` published (re-read when it changed)."""
        cached = self._files.get((host, port))
        if cached is None:
            cached = _CachedFile(self.directory / key_file_name(host, port))
            self._files[(host, port)] = cached
        try:
            return cached.key()
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
