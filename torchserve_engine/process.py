"""Start, stop and inspect the TorchServe server that cnnserve runs.

TorchServe's own launcher is unreliable as a readiness signal: ``torchserve --start`` exits 0
even when a port is taken (the JVM dies seconds later) and ``/ping`` says healthy before any
worker has loaded its model. So :func:`start` watches the JVM itself and returns only when
the management API shows a READY worker for every archive in the model store (there may be
none: the gateway registers versions itself, :mod:`.management`) — or stops everything and
raises with the reason from the logs. Archives left in the store are what a restarted
TorchServe serves again.

Each server gets a *run directory* beside its archives (``<model store>/.run``; hidden, so
TorchServe never mistakes it for a model) holding ``config.properties``, ``log4j2.xml``,
``key_file.json``, ``logs/`` and ``state.json``, and a private temporary directory for the
pid file, worker sockets and unpacked archives — so several servers (tests running in
parallel) never share files.

Its keys expire (``torchserve_token_expiration_min``) and nothing in TorchServe renews them:
:func:`renew_keys` does, through TorchServe's token API, once less than
``torchserve_token_renew_fraction`` of a key's lifetime is left. Whoever holds the server
calls it every second: the container's entry point, a gateway for the servers of its
model stores, or the detached renewer ``cnnserve torchserve start`` leaves behind
(:mod:`.renewer`; its pid in the run directory, so :func:`stop` ends it and :func:`status`
reports it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil

from cnnserve.errors import UnavailableError, require_extra
from cnnserve.settings import Settings

from . import TorchServeError
from .archive import archived_label, store_archives, version_label
from .config import config_properties, log4j2_xml, management_address
from .keys import EXPIRING, KeyKind, key_expiry, read_key

RUN_DIR_NAME = ".run"
STATE_FILE = "state.json"
KEY_FILE = "key_file.json"
LAUNCHER_OUTPUT = "torchserve.out"
#: Held (``flock``) while one process renews a server's keys: a renewal refuses the key before
#: it at once, so two renewers racing (several gateway processes, a gateway and an entry
#: point) would each cut off the key the other just drew.
RENEWAL_LOCK = "key_renewal.lock"
#: The detached renewer ``cnnserve torchserve start`` leaves behind (:mod:`.renewer`): its
#: module, its pid file in the run directory and its log file in ``logs/``.
RENEWER_MODULE = "cnnserve.torchserve_engine.renewer"
RENEWER_PID_FILE = "renewer.pid"
RENEWER_LOG = "renewer.log"
#: How long TorchServe's token API may take to draw a key.
RENEW_TIMEOUT_S = 10.0
#: The Debian package to install when Java is missing.
JAVA_PACKAGE = "openjdk-17-jre-headless"
JVM_MAIN_CLASS = "org.pytorch.serve.ModelServer"
#: TorchServe's launcher keeps the JVM's pid here, under the temporary directory.
PID_FILE = ".model_server.pid"
POLL_INTERVAL_S = 0.5
#: Most models one management listing returns (TorchServe pages its list; cnnserve serves few).
LIST_LIMIT = 1000
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ServerInfo:
    """A TorchServe started by :func:`start`; saved as ``state.json`` in its run directory."""

    pid: int
    run_dir: Path
    tmp_dir: Path
    model_store: Path
    #: The model versions registered at start (``<name>/<version>``), one per archive.
    models: tuple[str, ...]
    inference_url: str
    management_url: str
    metrics_url: str
    grpc_target: str
    #: TorchServe's ``key_file.json``; ``None`` when token authorization is off.
    key_file: Path | None
    #: Seconds each key TorchServe draws stays valid (``None``: tokens off, or a state file
    #: written before renewal existed: such a server is not renewed).
    token_lifetime_s: float | None = None

    def key(self, kind: KeyKind) -> str | None:
        """The ``inference`` or ``management`` key; ``None`` without token authorization."""
        return read_key(self.key_file, kind) if self.key_file is not None else None

    def save(self) -> None:
        """Write ``state.json`` (stop and status read it)."""
        state = {key: _jsonable(value) for key, value in asdict(self).items()}
        (self.run_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> ServerInfo | None:
        """The saved state in ``run_dir``; ``None`` when no server was started from it."""
        try:
            state = json.loads((run_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        for key in ("run_dir", "tmp_dir", "model_store"):
            state[key] = Path(state[key])
        state["key_file"] = Path(state["key_file"]) if state["key_file"] else None
        state["models"] = tuple(state["models"])
        return cls(**state)


@dataclass(frozen=True)
class ServerStatus:
    """What :func:`status` found: whether the server runs, and its workers' states by model
    version (``<name>/<version>``) for every version registered now."""

    running: bool
    info: ServerInfo | None
    workers: dict[str, list[str]]
    #: The pid of the detached key renewer (:mod:`.renewer`); ``None`` when none runs.
    renewer_pid: int | None = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def run_dir_of(model_store: Path) -> Path:
    """The run directory of the server serving ``model_store``."""
    return model_store.resolve() / RUN_DIR_NAME


def loopback_settings(
    model_store: Path, ports: Sequence[int], token_auth: bool = True, **overrides: Any
) -> Settings:
    """Settings for a TorchServe on 127.0.0.1 serving ``model_store`` on the six ``ports``.

    The ports are, in order: inference, management, metrics, gRPC inference, gRPC management
    and the first worker port. With ``token_auth`` the gateway reads the key from the run dir.
    """
    inference, management, metrics, grpc_inference, grpc_management, workers = ports
    return Settings(
        model_store_dir=model_store,
        torchserve_host="127.0.0.1",
        torchserve_inference_port=inference,
        torchserve_management_port=management,
        torchserve_metrics_port=metrics,
        torchserve_grpc_inference_port=grpc_inference,
        torchserve_grpc_management_port=grpc_management,
        torchserve_initial_worker_port=workers,
        torchserve_token_auth=token_auth,
        torchserve_key_file=run_dir_of(model_store) / KEY_FILE if token_auth else None,
        **overrides,
    )


def find_java() -> str:
    """The ``java`` TorchServe will run (``$JAVA_HOME/bin/java``, else the one on PATH)."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        raise TorchServeError(
            f"TorchServe needs Java 17, which is not installed; install it with "
            f"`apt-get install -y {JAVA_PACKAGE}` (or set JAVA_HOME)"
        )
    return java


def start(settings: Settings, model_store: Path | None = None) -> ServerInfo:
    """Start TorchServe on ``model_store``, registering every archive in it, and return once
    each has a READY worker.

    Raises :class:`~cnnserve.errors.MissingExtraError` when TorchServe is not installed, and
    :class:`TorchServeError` with the reason when Java is missing, an archive is
    unreadable, a server already runs from this store, the JVM exits (e.g. a port is taken)
    or a model version has no READY worker within ``settings.torchserve_start_timeout_s``;
    nothing is left running.
    """
    # TorchServe runs as ``python -m ts.model_server``: a missing package is named here.
    require_extra("torchserve", "TorchServe", "ts")
    find_java()
    store = (model_store or settings.model_store_dir).resolve()
    archives = {archived_label(path): path.name for path in store_archives(store)}
    run_dir = run_dir_of(store)
    previous = ServerInfo.load(run_dir)
    if previous is not None:
        if _jvm(previous.pid) is not None:
            raise TorchServeError(
                f"TorchServe already runs from {store} (pid {previous.pid}); "
                "stop it with `cnnserve torchserve stop`"
            )
        _clean(previous)
    info = _launch(settings, store, run_dir, archives)
    try:
        _wait_until_ready(
            info, settings.torchserve_start_timeout_s, settings.torchserve_token_renew_fraction
        )
    except BaseException:
        # Also on Ctrl-C: a half-started server must not outlive the command.
        _terminate(info)
        raise
    info.save()
    return info


def _launch(settings: Settings, store: Path, run_dir: Path, archives: dict[str, str]) -> ServerInfo:
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (run_dir / KEY_FILE).unlink(missing_ok=True)
    config = run_dir / "config.properties"
    config.write_text(config_properties(settings, store, list(archives.values())))
    log_config = run_dir / "log4j2.xml"
    log_config.write_text(log4j2_xml(logs))
    # Short and private: worker sockets live here and a socket path must stay under 108 bytes.
    tmp_dir = Path(tempfile.mkdtemp(prefix="cnnserve-ts-"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("TS_")}
    env.update(TEMP=str(tmp_dir), TMPDIR=str(tmp_dir), LOG_LOCATION=str(logs))
    env["METRICS_LOCATION"] = str(logs)
    command = [
        # TorchServe runs its workers with the Python that launched it: this one, which has
        # cnnserve installed, so the handlers can import it.
        sys.executable,
        "-m",
        "ts.model_server",
        "--start",
        "--ts-config",
        str(config),
        "--model-store",
        str(store),
        "--log-config",
        str(log_config),
        "--no-config-snapshots",
    ]
    with (logs / LAUNCHER_OUTPUT).open("ab") as output:
        # A new session: the server is a daemon, not a child of this terminal's job.
        launcher = subprocess.run(
            command,
            cwd=run_dir,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            timeout=60,
            check=False,
        )
    try:
        pid = int((tmp_dir / PID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise TorchServeError(
            f"TorchServe's launcher failed (exit {launcher.returncode}): "
            f"{_log_tail(logs / LAUNCHER_OUTPUT)}"
        ) from None
    host = settings.torchserve_host
    url_host = f"[{host}]" if ":" in host else host
    return ServerInfo(
        pid=pid,
        run_dir=run_dir,
        tmp_dir=tmp_dir,
        model_store=store,
        models=tuple(archives),
        inference_url=f"http://{url_host}:{settings.torchserve_inference_port}",
        management_url=management_address(settings),
        metrics_url=f"http://{url_host}:{settings.torchserve_metrics_port}",
        grpc_target=f"{url_host}:{settings.torchserve_grpc_inference_port}",
        key_file=run_dir / KEY_FILE if settings.torchserve_token_auth else None,
        token_lifetime_s=(
            settings.torchserve_token_expiration_min * 60
            if settings.torchserve_token_auth
            else None
        ),
    )


def _wait_until_ready(info: ServerInfo, timeout_s: float, renew_fraction: float) -> None:
    deadline = time.monotonic() + timeout_s
    workers: dict[str, list[str]] | None = None
    missing: list[int] = []
    with httpx.Client(timeout=5.0) as http:
        while time.monotonic() < deadline:
            jvm = _jvm(info.pid)
            if jvm is None:
                raise TorchServeError(f"TorchServe exited while starting: {_failure_reason(info)}")
            # The wait reads the workers with the management key, which may expire first (a
            # short lifetime, workers slow to load); nobody else renews it before the start.
            with contextlib.suppress(TorchServeError):  # not answering yet: the next poll
                renew_keys(info, renew_fraction)
            workers = _workers(http, info)
            if workers is not None and all("READY" in workers.get(m, []) for m in info.models):
                # The management API answers before the other listeners are bound (at once
                # when no model loads); the JVM must hold every port, not another server.
                missing = _not_listening(jvm, info)
                if not missing:
                    return
            time.sleep(POLL_INTERVAL_S)
    if missing:
        raise TorchServeError(
            f"port(s) {missing} answer but not from this TorchServe (pid {info.pid}); "
            "another server holds them"
        )
    if workers is None:
        raise TorchServeError(
            f"TorchServe's management API did not answer within {timeout_s:.0f} s; "
            f"log: {_log_tail(info.run_dir / 'logs' / 'ts_log.log')}"
        )
    waiting = [model for model in info.models if "READY" not in workers.get(model, [])]
    raise TorchServeError(
        f"no READY worker for {', '.join(waiting)} after {timeout_s:.0f} s; "
        f"worker log: {_log_tail(info.run_dir / 'logs' / 'model_log.log')}"
    )


def _workers(http: httpx.Client, info: ServerInfo) -> dict[str, list[str]] | None:
    """Worker states of every registered model version (``<name>/<version>``), from the
    management API; ``None`` while it does not answer."""
    try:
        key = info.key("management")
    except UnavailableError:  # key file not written (completely) yet
        return None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    states: dict[str, list[str]] = {}
    try:
        listed = http.get(
            f"{info.management_url}/models", params={"limit": LIST_LIMIT}, headers=headers
        )
        listed.raise_for_status()
        names = [str(model["modelName"]) for model in listed.json().get("models", [])]
        for name in names:
            described = http.get(f"{info.management_url}/models/{name}/all", headers=headers)
            for version in described.json() if described.status_code == 200 else []:
                label = version_label(name, version["modelVersion"])
                states[label] = [str(w.get("status")) for w in version.get("workers", [])]
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return states


def _not_listening(jvm: psutil.Process, info: ServerInfo) -> list[int]:
    """The ports callers use (inference, management, gRPC) that our JVM does not listen on."""
    ports = {int(url.rsplit(":", 1)[1]) for url in (info.inference_url, info.management_url)}
    ports.add(int(info.grpc_target.rsplit(":", 1)[1]))
    listening = {
        conn.laddr.port
        for conn in jvm.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN
    }
    return sorted(ports - listening)


def renew_keys(info: ServerInfo, fraction: float) -> list[KeyKind]:
    """Renew each key of ``info``'s TorchServe with less than ``fraction`` of its lifetime
    left; the kinds renewed (none with tokens off or ``fraction`` 0).

    TorchServe's token API (``GET /token?type=<kind>`` on the management API, with the ``API``
    key, which never expires) draws a new key with a new expiry and rewrites
    ``key_file.json``; the old key is refused from that moment on, so callers re-read the
    file when refused (:class:`~.client.TorchServeClient`). Raises :class:`TorchServeError`
    when the key file cannot be read or TorchServe does not renew.
    """
    if info.key_file is None or info.token_lifetime_s is None or fraction <= 0:
        return []
    margin = timedelta(seconds=fraction * info.token_lifetime_s)
    with _renewal_lock(info.run_dir):
        try:
            # Read under the lock: a renewer that held it before may have renewed already.
            now = datetime.now(UTC)
            due = [kind for kind in EXPIRING if key_expiry(info.key_file, kind) - now < margin]
            api_key = read_key(info.key_file, "API") if due else ""
        except UnavailableError as exc:
            raise TorchServeError(f"cannot renew TorchServe's keys: {exc}") from None
        for kind in due:
            _draw_key(info, kind, api_key)
    return due


def _draw_key(info: ServerInfo, kind: KeyKind, api_key: str) -> None:
    """Have ``info``'s TorchServe draw a new ``kind`` key (token API, with the ``API`` key)."""
    try:
        response = httpx.get(
            f"{info.management_url}/token",
            params={"type": kind},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=RENEW_TIMEOUT_S,
        )
    except httpx.HTTPError as exc:
        raise TorchServeError(
            f"TorchServe at {info.management_url} did not renew its {kind} key: "
            f"{exc or type(exc).__name__}"
        ) from None
    if response.status_code != httpx.codes.OK:
        raise TorchServeError(
            f"TorchServe at {info.management_url} refused to renew its {kind} key: "
            f"HTTP {response.status_code} {' '.join(response.text.split())[:200]}"
        )


def renew_keys_of(model_store: Path, fraction: float) -> list[KeyKind]:
    """:func:`renew_keys` for the TorchServe started from ``model_store``, if one runs there."""
    info = ServerInfo.load(run_dir_of(model_store))
    if info is None or not is_running(info):
        return []
    return renew_keys(info, fraction)


@contextlib.contextmanager
def _renewal_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's renewal lock (other processes wait for it)."""
    with (run_dir / RENEWAL_LOCK).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def stop(model_store: Path) -> bool:
    """Stop the TorchServe serving ``model_store`` and its workers; ``False`` if none ran."""
    run_dir = run_dir_of(model_store)
    # First, so it does not ask a server going down for keys; it exits by itself once the
    # JVM is gone too, this only saves it the wait.
    renewer = _renewer(run_dir)
    if renewer is not None:
        renewer.terminate()
        with contextlib.suppress(psutil.TimeoutExpired):
            renewer.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(psutil.NoSuchProcess):
            renewer.kill()
    (run_dir / RENEWER_PID_FILE).unlink(missing_ok=True)
    info = ServerInfo.load(run_dir)
    if info is None:
        return False
    _terminate(info)
    return True


def _renewer(run_dir: Path) -> psutil.Process | None:
    """The key renewer recorded in ``run_dir``, or ``None`` if it is gone (or its pid reused)."""
    try:
        pid = int((run_dir / RENEWER_PID_FILE).read_text().strip())
        process = psutil.Process(pid)
        command = process.cmdline()
        if process.status() == psutil.STATUS_ZOMBIE or RENEWER_MODULE not in command:
            return None
    except (OSError, ValueError, psutil.Error):
        return None
    # The same store: a recorded pid reused by the renewer of another server is not ours.
    return process if str(run_dir.parent) in command else None


def _terminate(info: ServerInfo) -> None:
    """``torchserve --stop --foreground`` (it waits), then make sure no process survives."""
    jvm = _jvm(info.pid)
    processes = [jvm, *jvm.children(recursive=True)] if jvm is not None else []
    if jvm is not None:
        env = dict(os.environ, TEMP=str(info.tmp_dir), TMPDIR=str(info.tmp_dir))
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [sys.executable, "-m", "ts.model_server", "--stop", "--foreground"],
                cwd=info.run_dir,
                env=env,
                capture_output=True,
                timeout=STOP_TIMEOUT_S + 10,
                check=False,
            )
    _, alive = psutil.wait_procs(processes, timeout=STOP_TIMEOUT_S)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=10)
    _clean(info)


def _clean(info: ServerInfo) -> None:
    shutil.rmtree(info.tmp_dir, ignore_errors=True)
    (info.run_dir / STATE_FILE).unlink(missing_ok=True)
    (info.run_dir / KEY_FILE).unlink(missing_ok=True)
    (info.run_dir / RENEWER_PID_FILE).unlink(missing_ok=True)


def status(model_store: Path, timeout_s: float = 5.0) -> ServerStatus:
    """Whether a server runs from ``model_store``, and its workers' states by model."""
    run_dir = run_dir_of(model_store)
    info = ServerInfo.load(run_dir)
    if info is None or _jvm(info.pid) is None:
        return ServerStatus(running=False, info=info, workers={})
    renewer = _renewer(run_dir)
    with httpx.Client(timeout=timeout_s) as http:
        return ServerStatus(
            running=True,
            info=info,
            workers=_workers(http, info) or {},
            renewer_pid=renewer.pid if renewer is not None else None,
        )


def is_running(info: ServerInfo) -> bool:
    """Whether the TorchServe ``info`` describes still runs (its JVM, not a reused pid)."""
    return _jvm(info.pid) is not None


def _jvm(pid: int) -> psutil.Process | None:
    """The TorchServe JVM with ``pid``, or ``None`` if it is gone (or the pid was reused)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE or JVM_MAIN_CLASS not in process.cmdline():
            return None
    except psutil.Error:
        return None
    return process


def _failure_reason(info: ServerInfo) -> str:
    """The most telling line of TorchServe's logs after it died."""
    logs = info.run_dir / "logs"
    lines = [
        line
        for path in (logs / LAUNCHER_OUTPUT, logs / "ts_log.log")
        if path.exists()
        for line in path.read_text(errors="replace").splitlines()
    ]
    for marker in ("Failed to bind", "Address already in use"):
        for line in lines:
            if marker in line:
                return f"{line.split(' - ', 1)[-1].strip()} (is another server using the port?)"
    return f"{_log_tail(logs / LAUNCHER_OUTPUT)} (logs in {logs})"


def _log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a log, on one line, for an error message."""
    if not path.exists():
        return f"{path} is empty"
    tail = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(tail[-lines:]) or f"{path} is empty"
