"""The TorchServe container's entry point (deploy/Dockerfile, target ``torchserve``).

``serve`` (the default command) starts TorchServe exactly as ``cnnserve torchserve start``
does — configuration from the ``CNNSERVE_*`` settings, back only once every model has a READY
worker — then:

- with token authorization on, publishes TorchServe's inference key (never the management
  key) into ``CNNSERVE_TORCHSERVE_KEY_DIR`` as ``<ip>_<port>.json``, named after the address
  the gateway reaches this replica at (its own IP, the gRPC inference port): a volume every
  replica writes and the gateway mounts read-only, so each replica's key reaches the gateway
  without being baked into an image. Without a key directory it goes to
  ``CNNSERVE_TORCHSERVE_KEY_FILE`` (one replica). With tokens off, a stale copy is removed;
  on SIGTERM the replica removes its published key;
- renews TorchServe's keys before they expire (``renew_keys`` of
  :mod:`cnnserve.torchserve_engine.process`, checked every second;
  ``CNNSERVE_TORCHSERVE_TOKEN_RENEW_FRACTION``) and publishes the new inference key at once:
  TorchServe refuses the old one from the moment it draws the new one, and the gateway
  retries a refused call with the key it reads again;
- copies TorchServe's log files (server, model workers with the handlers' errors, access) to
  its own stdout as they grow, from the start on, so ``docker logs`` and ``make logs`` show
  them; the files stay where TorchServe writes them;
- stays in the foreground while the JVM lives. When the JVM dies it exits 1, so the
  orchestrator restarts the container; so it does when TorchServe has refused the published
  key for ``CNNSERVE_TORCHSERVE_KEY_REFUSED_EXIT_S`` (90 s; renewal failed and the keys
  expired: a restarted TorchServe draws fresh ones); on SIGTERM/SIGINT it stops TorchServe
  and exits 0.

``ready`` is the HEALTHCHECK and Kubernetes readiness probe: exit 0 only while every model has
a READY worker (TorchServe's ``/ping`` says healthy before any worker has loaded its model)
and TorchServe accepts the inference key this replica published (an expired key leaves the
workers READY while every call is refused).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TextIO

import httpx
import psutil

from cnnserve.errors import UnavailableError
from cnnserve.settings import Settings
from cnnserve.torchserve_engine import TorchServeError
from cnnserve.torchserve_engine.keys import key_file_name, read_inference_key
from cnnserve.torchserve_engine.process import (
    RUN_DIR_NAME,
    ServerInfo,
    renew_keys,
    start,
    status,
    stop,
)

#: How often the foreground loop checks that the JVM still lives and its keys are fresh.
POLL_INTERVAL_S = 1.0
#: The model ``ready`` asks TorchServe for to check the key: a hidden name, which no archive
#: cnnserve registers has. TorchServe checks the key first (HTTP 400 when refused), then
#: answers 404 for the unknown model, running nothing.
KEY_CHECK_MODEL = ".cnnserve-key-check"
#: How long that check may take.
KEY_CHECK_TIMEOUT_S = 5.0
#: How often ``serve`` makes that check itself (``torchserve_key_refused_exit_s``).
KEY_WATCH_INTERVAL_S = 10.0


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived; a BaseException so ``start`` cleans up if it is waiting."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise StopRequested(signal.Signals(signum).name)


def own_address() -> str:
    """The IP address other containers reach this one at (what DNS answers for it)."""
    return socket.gethostbyname(socket.gethostname())


def published_key_path(settings: Settings) -> Path | None:
    """Where this replica publishes its inference key (``None``: nowhere)."""
    if settings.torchserve_key_dir is not None:
        name = key_file_name(own_address(), settings.torchserve_grpc_inference_port)
        return settings.torchserve_key_dir / name
    return settings.torchserve_key_file


def publish_key(source: Path | None, target: Path | None) -> None:
    """Write the inference key of TorchServe's key file ``source`` to ``target`` atomically,
    readable by owner only; the management key stays behind.

    ``source`` is ``None`` when token authorization is off: then an old copy at ``target`` is
    removed, so no gateway keeps sending a key of an earlier run.
    """
    if target is None or (source is not None and source.resolve() == target.resolve()):
        return
    if source is None:
        target.unlink(missing_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: a gateway reading it never sees half a file.
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".key_file.")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump({"inference": {"key": read_inference_key(source)}}, out)
        os.chmod(temporary, 0o600)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class KeyWatch:
    """Whether TorchServe has refused this replica's published key for too long: checked every
    :data:`KEY_WATCH_INTERVAL_S` (one cheap call, :func:`key_refusal`)."""

    def __init__(self, settings: Settings, info: ServerInfo) -> None:
        self.settings = settings
        self.info = info
        self._next_check = time.monotonic() + KEY_WATCH_INTERVAL_S
        #: When the refusals began (``None``: the last check was accepted).
        self._refused_since: float | None = None

    def refused_too_long(self) -> str | None:
        """The refusal, once it has lasted ``torchserve_key_refused_exit_s``; else ``None``."""
        limit = self.settings.torchserve_key_refused_exit_s
        now = time.monotonic()
        if limit <= 0 or now < self._next_check:
            return None
        self._next_check = now + KEY_WATCH_INTERVAL_S
        refusal = key_refusal(self.settings, self.info)
        if refusal is None:
            self._refused_since = None
            return None
        if self._refused_since is None:
            self._refused_since = now
            print(f"warning: {refusal}", file=sys.stderr, flush=True)
        return refusal if now - self._refused_since >= limit else None


class KeyKeeper:
    """Renews the keys of ``info``'s TorchServe before they expire and publishes its inference
    key to ``target`` whenever it changed (renewed here or by anyone else)."""

    def __init__(self, info: ServerInfo, fraction: float, target: Path | None) -> None:
        self.info = info
        self.fraction = fraction
        self.target = target
        #: The inference key last published (``None``: none yet, or published before this
        #: object existed: published again at the first check, harmlessly).
        self._published: str | None = None
        self._failing = False

    def check(self) -> None:
        """Renew what is due, then publish the inference key if it is not the one published."""
        if self.info.key_file is None:
            return
        try:
            renewed = renew_keys(self.info, self.fraction)
        except TorchServeError as exc:
            if not self._failing:  # once per failing spell, not every second
                print(f"warning: {exc} (trying again every second)", file=sys.stderr, flush=True)
            self._failing = True
        else:
            if renewed:
                print(f"renewed TorchServe's {' and '.join(renewed)} key", flush=True)
            self._failing = False
        try:
            key = read_inference_key(self.info.key_file)
            if key != self._published:
                publish_key(self.info.key_file, self.target)
                self._published = key
        except UnavailableError:
            pass  # TorchServe is rewriting its key file in place: next poll


def key_refusal(settings: Settings, info: ServerInfo) -> str | None:
    """Why TorchServe refuses the inference key this replica published (``None``: accepted,
    or token authorization off): an inference-API call for :data:`KEY_CHECK_MODEL`."""
    if info.key_file is None:
        return None
    published = published_key_path(settings) or info.key_file
    try:
        key = read_inference_key(published)
        response = httpx.get(
            f"{info.inference_url}/predictions/{KEY_CHECK_MODEL}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=KEY_CHECK_TIMEOUT_S,
        )
    except UnavailableError as exc:
        return str(exc)
    except httpx.HTTPError as exc:
        return f"TorchServe's inference API did not answer: {exc or type(exc).__name__}"
    if response.status_code == httpx.codes.NOT_FOUND:
        return None
    return (
        f"TorchServe refuses the inference key published in {published}: "
        f"HTTP {response.status_code} {' '.join(response.text.split())[:160]}"
    )


#: TorchServe's log files copied to stdout (metrics are scraped, not logged).
FOLLOWED_LOGS = ("ts_log.log", "model_log.log", "access_log.log")


class LogFollower:
    """Copies what TorchServe appends to its log files to stdout, from a thread of its own
    (TorchServe logs while :func:`start` waits for its workers)."""

    def __init__(self, log_dir: Path, out: TextIO = sys.stdout) -> None:
        self.log_dir = log_dir
        self.out = out
        # What is there already was shown by an earlier run of this container (a restart
        # keeps its files): only what TorchServe appends from now on is copied.
        self._offsets = {name: _size(log_dir / name) for name in FOLLOWED_LOGS}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-follower", daemon=True)

    def __enter__(self) -> LogFollower:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(POLL_INTERVAL_S / 2):
            self.copy_new_lines()
        self.copy_new_lines()

    def copy_new_lines(self) -> None:
        """Write every complete line added to a followed file since the last call."""
        for name, last_offset in self._offsets.items():
            path = self.log_dir / name
            size = _size(path)
            # Smaller than what was read: rolled over, the file was started anew.
            offset = last_offset if size >= last_offset else 0
            if size == offset:
                continue
            with path.open("rb") as file:
                file.seek(offset)
                chunk = file.read(size - offset)
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self._offsets[name] = offset + len(complete)
            if complete:
                self.out.write(complete.decode("utf-8", "replace"))
                self.out.flush()


def _size(path: Path) -> int:
    """The size of ``path`` in bytes; 0 while it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def jvm_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def reap_children() -> None:
    """Collect exited children: as PID 1 this process adopts TorchServe's orphans."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(settings: Settings) -> int:
    """Start TorchServe, publish its key, and wait; the container's exit status."""
    store = settings.model_store_dir
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)
    with LogFollower(store / RUN_DIR_NAME / "logs"):
        return _serve(settings, store)


def _serve(settings: Settings, store: Path) -> int:
    """:func:`serve` once the signal handlers are set and the logs followed."""
    try:
        info = start(settings, store)
        published = published_key_path(settings)
        publish_key(info.key_file, published)  # tokens off: removes a stale copy
        keys = KeyKeeper(info, settings.torchserve_token_renew_fraction, published)
        watch = KeyWatch(settings, info)
        print(f"TorchServe ready (pid {info.pid}): {', '.join(info.models)}", flush=True)
        while jvm_alive(info.pid):
            reap_children()
            keys.check()
            refusal = watch.refused_too_long()
            if refusal is not None:
                # Only a new TorchServe draws keys the token API could not renew: exit 1 and
                # let the orchestrator restart the container.
                print(
                    f"error: {refusal} for {settings.torchserve_key_refused_exit_s:.0f} s: "
                    "stopping TorchServe so that the container restarts with fresh keys",
                    file=sys.stderr,
                    flush=True,
                )
                if settings.torchserve_key_dir is not None:
                    publish_key(None, published)  # a refused key must not stay published
                stop(store)
                return 1
            time.sleep(POLL_INTERVAL_S)
    except StopRequested as request:
        # A second signal must not interrupt the orderly stop.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        print(f"{request}: stopping TorchServe", flush=True)
        if settings.torchserve_key_dir is not None:
            # This address leaves the rotation; its key must not outlive it.
            publish_key(None, published_key_path(settings))
        stop(store)
        return 0
    except TorchServeError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    logs = info.run_dir / "logs"
    print(f"error: TorchServe (pid {info.pid}) exited; logs in {logs}", file=sys.stderr)
    stop(store)
    return 1


def ready(settings: Settings) -> int:
    """0 when TorchServe runs, every model has a READY worker and TorchServe accepts the
    published inference key, else 1 (with the reason)."""
    found = status(settings.model_store_dir)
    if not found.running:
        print("TorchServe is not running")
        return 1
    # The key first: expired keys (the management key too) leave the workers unreadable, and
    # "no READY worker" would hide why.
    refusal = key_refusal(settings, found.info) if found.info is not None else None
    if refusal is not None:
        print(refusal)
        return 1
    waiting = [model for model, states in found.workers.items() if "READY" not in states]
    if not found.workers or waiting:
        print(f"no READY worker for {', '.join(waiting) or 'any model'}")
        return 1
    print(f"ready: {', '.join(found.workers)}")
    return 0


COMMANDS = {"serve": serve, "ready": ready}


def main(argv: list[str]) -> int:
    """Run the command named by ``argv[0]`` (default ``serve``)."""
    name = argv[0] if argv else "serve"
    if name not in COMMANDS or len(argv) > 1:
        print(f"usage: torchserve_entrypoint.py [{'|'.join(COMMANDS)}]", file=sys.stderr)
        return 2
    return COMMANDS[name](Settings())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
