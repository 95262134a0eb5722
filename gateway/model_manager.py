"""The model manager: which versions of which models the gateway serves, and their lifecycle.

It reads the model repository (:mod:`cnnserve.models.repository`), applies each model's
version policy, loads and unloads versions through the backend, and gives the data plane the
version a request goes to. The transports' repository routes (Triton's repository extension,
``ModelConfig``, ``ModelStatistics``) call :meth:`ModelManager.index`, :meth:`~ModelManager.load`,
:meth:`~ModelManager.unload`, :meth:`~ModelManager.version` and
:meth:`~ModelManager.statistics`; they reach it as ``DataPlane.models``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cnnserve.models.repository import ModelVersion

from .statistics import ModelStatistics


class ModelState(enum.StrEnum):
    """A version's state, as Triton's repository index names them."""

    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"


@dataclass(frozen=True)
class VersionState:
    """One row of the repository index (Triton's ``RepositoryIndexResponse.ModelIndex``)."""

    name: str
    #: The version number as text; ``""`` for a model with no loadable version.
    version: str
    state: ModelState
    #: Why the version is not READY (a config error, an artifact error, a load failure,
    #: ``unloaded``); ``""`` when READY.
    reason: str = ""


class ModelManager:
    """The served versions of every model; see the module docstring.

    This is the API the transports code against; the implementation lands with the data
    plane's switch to the model repository.
    """

    def index(self, ready_only: bool = False) -> list[VersionState]:
        """Every model folder of the repository and every loaded model, each version with its
        state and reason, sorted by name and version (Triton's ``RepositoryIndex``);
        ``ready_only``: the READY ones only."""
        raise NotImplementedError

    async def load(self, name: str) -> None:
        """Re-read model ``name``'s folder, load the versions its policy selects and unload
        the others (in-flight requests finish first). Raises ``InvalidInputError`` for an
        unsafe name, ``UnknownModelError`` when the repository has no such folder, and
        ``UnavailableError`` with the reason when no version could be loaded."""
        raise NotImplementedError

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name`` (in-flight requests finish first);
        ``UnknownModelError`` when none is loaded."""
        raise NotImplementedError

    def version(self, name: str, version: str = "") -> ModelVersion:
        """The ready version ``version`` of ``name`` (``""``: the highest ready one);
        ``UnknownModelError`` naming the available versions otherwise."""
        raise NotImplementedError

    def statistics(self, name: str = "", version: str = "") -> list[ModelStatistics]:
        """Statistics of the loaded versions: all (``name`` empty), one model's, or one
        version's; ``UnknownModelError`` when ``name`` (or that version) is not loaded."""
        raise NotImplementedError
