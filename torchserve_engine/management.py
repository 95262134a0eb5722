"""Register and unregister model versions with a TorchServe on this machine, live.

TorchServe's management API (``POST /models``, ``DELETE /models/{name}/{version}``, 0.12)
listens on the loopback interface only and, with token authorization, wants the *management*
key — which stays in the server's own ``key_file.json`` and is never published (only the
inference key is, :mod:`.keys`). So versions are registered with servers on this machine that
cnnserve started (:func:`.process.start`): each is known by its model store, whose run directory
holds its management address (``state.json``) and key, read again at every call so a restarted
server (new key, maybe new pid) is found without a restart here, and once more when TorchServe
refuses it: a key renewed (:func:`.process.renew_keys`) between reading and calling.

Registering a version archives it into the server's model store (``<name>.<N>.mar``,
:func:`.archive.archive_version`) and asks TorchServe to register that file under the model's
name, synchronously: the call returns once a worker has loaded the version, or fails with
TorchServe's reason (and the worker's own error from its log when a load failed). The archive
stays in the store while the version is registered — the store is what a TorchServe serves
when it starts, so one restarted, or started only after the gateway, serves it too;
unregistering removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from cnnserve.errors import UnavailableError
from cnnserve.models.repository import ModelVersion
from cnnserve.settings import Settings

from . import TorchServeError
from .archive import Archive, archive_name, archive_version, archived_digest
from .process import ServerInfo, is_running, run_dir_of

logger = logging.getLogger(__name__)

#: How long an unregistration may take (TorchServe stops the version's workers first).
UNREGISTER_TIMEOUT_S = 60.0
#: How TorchServe's REST APIs answer a key they refuse (HTTP 400, this error type).
KEY_REFUSED = "InvalidKeyException"
#: What TorchServe's Python worker logs when a handler fails to load its model.
LOAD_FAILED = "Failed to load model "


class ManagedServer:
    """A TorchServe on this machine started from ``model_store``, whose versions cnnserve
    registers; ``settings`` gives the archives' TorchServe settings and the workers each
    version starts with.

    It unregisters only the versions it registered itself. One TorchServe already held, from
    the same files, when asked to register it (archived into its store by someone else: a
    store TorchServe was started with, another gateway process) stays as it was found.
    """

    def __init__(self, model_store: Path, settings: Settings, http: httpx.AsyncClient) -> None:
        self.model_store = model_store.resolve()
        self._settings = settings
        self._http = http
        #: The versions this object registered (or left in the store for TorchServe's start).
        self._owned: set[tuple[str, int]] = set()

    def __str__(self) -> str:
        return f"the TorchServe of {self.model_store}"

    async def register(self, version: ModelVersion, replace: bool = False) -> None:
        """Archive ``version`` into the store and register it under its model's name.

        TorchServe holds one copy of each version. One it holds already (restarted from its
        store, registered by another gateway process) is kept when it was built from the same
        files, and replaced otherwise — or always, with ``replace`` (the version changed in
        place). A server that is not running registers the archive when it starts. Raises
        :class:`UnavailableError` naming the server and the reason when the archive cannot be
        built, the server does not answer, or TorchServe refuses the version or its worker
        fails to load it; the archive is removed again then.
        """
        name, number = version.spec.name, version.version
        previous = archived_digest(self.model_store / archive_name(name, number))
        try:
            archive = await asyncio.to_thread(
                archive_version, version, self.model_store, self._settings
            )
        except TorchServeError as exc:
            raise UnavailableError(f"{self}: {exc}") from None
        info = ServerInfo.load(run_dir_of(self.model_store))
        if info is None or not is_running(info):
            logger.warning(
                "%s is not running: %s version %d waits in its store until it starts",
                self,
                name,
                number,
            )
            self._owned.add((name, number))
            return
        try:
            response = await self._register(info, archive)
            if response.status_code == httpx.codes.CONFLICT:
                if not replace and previous == archive.digest:
                    logger.info("%s holds %s version %d already", self, name, number)
                    return  # whoever registered it stays its owner
                logger.info("%s holds another %s version %d; replacing it", self, name, number)
                await self._delete(info, name, number)
                response = await self._register(info, archive)
            if not response.is_success:
                reason = f"{_message(response)}{self._worker_reason(info, name, number)}"
                # A version whose workers failed can stay registered, its workers retrying.
                with contextlib.suppress(UnavailableError):
                    await self._delete(info, name, number)
                raise UnavailableError(
                    f"{self} could not register {name} version {number}: {reason}"
                )
        except BaseException:
            archive.path.unlink(missing_ok=True)
            self._owned.discard((name, number))
            raise
        self._owned.add((name, number))
        logger.info("%s registered %s version %d", self, name, number)

    async def unregister(self, name: str, version: int) -> None:
        """Unregister version ``version`` of ``name`` and remove its archive from the store,
        if this object registered it (see the class docstring).

        A version TorchServe does not hold (a restart dropped it) is simply gone; a server
        that is not running has nothing to unregister. Raises :class:`UnavailableError` when
        TorchServe does not answer or refuses.
        """
        if (name, version) not in self._owned:
            logger.info("%s keeps %s version %d: registered by another", self, name, version)
            return
        self._owned.discard((name, version))
        # First, so a TorchServe starting meanwhile does not register it again.
        (self.model_store / archive_name(name, version)).unlink(missing_ok=True)
        info = ServerInfo.load(run_dir_of(self.model_store))
        if info is not None and is_running(info):
            await self._delete(info, name, version)
            logger.info("%s unregistered %s version %d", self, name, version)

    async def _call(
        self, info: ServerInfo, method: str, path: str, timeout_s: float, **params: Any
    ) -> httpx.Response:
        """The management API's answer, made once more if the key was renewed meanwhile."""
        key = info.key("management")
        response = await self._send(info, method, path, key, timeout_s, params)
        if _key_refused(response):
            renewed = info.key("management")
            if renewed != key:
                response = await self._send(info, method, path, renewed, timeout_s, params)
        return response

    async def _send(
        self,
        info: ServerInfo,
        method: str,
        path: str,
        key: str | None,
        timeout_s: float,
        params: dict[str, Any],
    ) -> httpx.Response:
        try:
            return await self._http.request(
                method,
                f"{info.management_url}{path}",
                params=params,
                headers={"Authorization": f"Bearer {key}"} if key else {},
                timeout=timeout_s,
            )
        except httpx.HTTPError as exc:
            raise UnavailableError(
                f"{self} did not answer at {info.management_url}: {exc or type(exc).__name__}"
            ) from None

    async def _register(self, info: ServerInfo, archive: Archive) -> httpx.Response:
        return await self._call(
            info,
            "POST",
            "/models",
            self._settings.torchserve_start_timeout_s,
            url=archive.path.name,
            model_name=archive.model,
            initial_workers=self._settings.torchserve_workers_per_model,
            synchronous="true",
        )

    async def _delete(self, info: ServerInfo, name: str, version: int) -> None:
        path = f"/models/{name}/{version}"
        response = await self._call(info, "DELETE", path, UNREGISTER_TIMEOUT_S)
        if response.status_code == httpx.codes.FORBIDDEN:
            # TorchServe never removes a model's default version while it has others; our
            # calls always name a version, so the default only matters for this rule.
            await self._hand_default_over(info, name, version)
            response = await self._call(info, "DELETE", path, UNREGISTER_TIMEOUT_S)
        if response.status_code == httpx.codes.NOT_FOUND:
            return
        if not response.is_success:
            raise UnavailableError(
                f"{self} could not unregister {name} version {version}: {_message(response)}"
            )

    async def _hand_default_over(self, info: ServerInfo, name: str, version: int) -> None:
        """Make another registered version of ``name`` its default."""
        response = await self._call(info, "GET", f"/models/{name}/all", UNREGISTER_TIMEOUT_S)
        described = response.json() if response.is_success else []
        others = [
            str(v["modelVersion"]) for v in described if str(v["modelVersion"]) != str(version)
        ]
        if others:
            await self._call(
                info, "PUT", f"/models/{name}/{others[0]}/set-default", UNREGISTER_TIMEOUT_S
            )

    def _worker_reason(self, info: ServerInfo, name: str, version: int) -> str:
        """The worker's own error when it failed to load the version, from TorchServe's log.

        TorchServe answers a failed load with "Failed to start workers"; why is in the
        worker's output, which TorchServe logs under the worker's name
        (``W-<port>-<name>_<N>-stdout``): its line "Failed to load model <name>, exception
        <message>" (the latest, should an earlier attempt have failed too).
        """
        log = info.run_dir / "logs" / "model_log.log"
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        marker = f"-{name}_{version}-stdout"
        failures = [line for line in lines if marker in line and LOAD_FAILED in line]
        if not failures:
            return ""
        reason = failures[-1].split(LOAD_FAILED, 1)[1].partition(", exception ")[2].strip()
        return f"; the worker said: {reason}" if reason else ""


def _key_refused(response: httpx.Response) -> bool:
    """Whether TorchServe refused the key (it answers 400, not 401)."""
    if response.status_code != httpx.codes.BAD_REQUEST:
        return False
    try:
        return bool(response.json().get("type") == KEY_REFUSED)
    except (ValueError, AttributeError):
        return False


def _message(response: httpx.Response) -> str:
    """TorchServe's error message (its JSON body's ``message``), else the status line."""
    try:
        message = response.json().get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else f"HTTP {response.status_code} {response.reason_phrase}"


class Registrar:
    """Registers versions with every TorchServe on this machine that serves the gateway (one
    per model store: several replicas behind one gateway each need every version).

    Create it anywhere; :meth:`start` inside the running event loop opens its HTTP client.
    """

    def __init__(self, model_stores: Sequence[Path], settings: Settings) -> None:
        self.model_stores = [store.resolve() for store in model_stores]
        self._settings = settings
        self._http: httpx.AsyncClient | None = None
        self._servers: list[ManagedServer] = []

    async def start(self) -> None:
        """Open the HTTP client the management calls share."""
        self._http = httpx.AsyncClient()
        self._servers = [ManagedServer(s, self._settings, self._http) for s in self.model_stores]

    async def close(self) -> None:
        """Close the HTTP client."""
        http, self._http = self._http, None
        self._servers = []
        if http is not None:
            await http.aclose()

    async def register(self, version: ModelVersion, replace: bool = False) -> None:
        """Register ``version`` with every server; if one refuses, the others drop it again
        and its error (the first, should several refuse) is raised."""
        servers = self._started()
        results = await asyncio.gather(
            *(server.register(version, replace) for server in servers), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if not failures:
            return
        done = [
            s for s, r in zip(servers, results, strict=True) if not isinstance(r, BaseException)
        ]
        await asyncio.gather(
            *(server.unregister(version.spec.name, version.version) for server in done),
            return_exceptions=True,
        )
        raise failures[0]

    async def unregister(self, name: str, version: int) -> None:
        """Unregister version ``version`` of ``name`` from every server; the first refusal is
        raised once all were asked."""
        results = await asyncio.gather(
            *(server.unregister(name, version) for server in self._started()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _started(self) -> list[ManagedServer]:
        if self._http is None:
            raise UnavailableError("the TorchServe registrar is not started")
        return self._servers
