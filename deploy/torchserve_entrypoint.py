"""The TorchServe container's entry point (deploy/Dockerfile, target ``torchserve``).

``serve`` (the default command) starts TorchServe exactly as ``cnnserve torchserve start``
does — configuration from the ``CNNSERVE_*`` settings, back only once every model has a READY
worker — then:

- with token authorization on, copies TorchServe's ``key_file.json`` to
  ``CNNSERVE_TORCHSERVE_KEY_FILE`` (a volume the gateway mounts read-only), so the key reaches
  the gateway without being baked into an image; with it off, removes a stale copy there;
- stays in the foreground while the JVM lives. When the JVM dies it exits 1, so the
  orchestrator restarts the container; on SIGTERM/SIGINT it stops TorchServe and exits 0.

``ready`` is the HEALTHCHECK and Kubernetes readiness probe: exit 0 only while every model has
a READY worker (TorchServe's ``/ping`` says healthy before any worker has loaded its model).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import psutil

from cnnserve.settings import Settings
from cnnserve.torchserve_engine import TorchServeError
from cnnserve.torchserve_engine.process import start, status, stop

#: How often the foreground loop checks that the JVM still lives.
POLL_INTERVAL_S = 1.0


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived; a BaseException so ``start`` cleans up if it is waiting."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise StopRequested(signal.Signals(signum).name)


def publish_key(source: Path | None, target: Path | None) -> None:
    """Copy TorchServe's key file ``source`` to ``target`` atomically, readable by owner only.

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
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out)
        os.chmod(temporary, 0o600)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
    try:
        info = start(settings, store)
        publish_key(info.key_file, settings.torchserve_key_file)
        print(f"TorchServe ready (pid {info.pid}): {', '.join(info.models)}", flush=True)
        while jvm_alive(info.pid):
            reap_children()
            time.sleep(POLL_INTERVAL_S)
    except StopRequested as request:
        # A second signal must not interrupt the orderly stop.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        print(f"{request}: stopping TorchServe", flush=True)
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
    """0 when TorchServe runs and every model has a READY worker, else 1 (with the reason)."""
    found = status(settings.model_store_dir)
    if not found.running:
        print("TorchServe is not running")
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
