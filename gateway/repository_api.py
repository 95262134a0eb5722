"""Triton's model repository, model configuration and statistics extensions, for both transports.

The gRPC servicer and the REST routes decode their wire's request, call one function here and
encode the answer (:mod:`cnnserve.protocol.triton_codec`); what a call accepts and how a
model's configuration is described is decided here, once. The work itself is the model
manager's (:attr:`DataPlane.models <cnnserve.gateway.dataplane.DataPlane.models>`).

Refusals, through the error table: an unsafe model name is invalid input (400 /
INVALID_ARGUMENT) before anything is looked up; a model or version that is not there is
NOT_FOUND (404); load and unload outside explicit mode, and a load that fails, are
UNAVAILABLE (503) with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping

from cnnserve.errors import InvalidInputError
from cnnserve.models.repository import LatestPolicy, ModelVersion, VersionPolicy, check_model_name
from cnnserve.protocol.domain import (
    ConfigTensor,
    ModelConfiguration,
    ModelMetadata,
    TensorMetadata,
    VersionChoice,
)
from cnnserve.protocol.triton_codec import RepositoryParameter
from cnnserve.settings import Settings

from .dataplane import DataPlane
from .model_manager import VersionState
from .statistics import ModelStatistics

#: Triton's backend name for each platform cnnserve reports; any other is its own backend.
TRITON_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch"}
#: The unload parameter Triton's clients send; a cnnserve model has no dependents to unload.
UNLOAD_DEPENDENTS = "unload_dependents"


def _one_repository(repository: str) -> None:
    if repository:
        raise InvalidInputError(
            f"repository {repository!r}: cnnserve serves one model repository; leave "
            "repository_name empty"
        )


def index(core: DataPlane, ready: bool, repository: str = "") -> list[VersionState]:
    """Every model of the repository and its versions' states; ``ready``: READY ones only."""
    _one_repository(repository)
    return core.models.index(ready_only=ready)


async def load(
    core: DataPlane,
    name: str,
    parameters: Mapping[str, RepositoryParameter],
    repository: str = "",
) -> None:
    """Load (or reload) ``name`` from its folder. Triton's ``config`` and ``file:`` parameters
    (a configuration or files sent with the call) are refused: a model is what its folder
    holds."""
    _one_repository(repository)
    check_model_name(name)
    for key in parameters:
        if key == "config":
            raise InvalidInputError(
                f"load parameter 'config' is not accepted: {name} is served as its "
                "config.yaml in the model repository says; edit that file and load again"
            )
        if key.startswith("file:"):
            raise InvalidInputError(
                f"load parameter {key!r} is not accepted: models are not uploaded; export "
                "them into the repository (cnnserve export --repository) and load them"
            )
        raise InvalidInputError(f"unknown load parameter {key!r}; load takes none")
    await core.models.load(name)


async def unload(
    core: DataPlane,
    name: str,
    parameters: Mapping[str, RepositoryParameter],
    repository: str = "",
) -> None:
    """Unload every version of ``name``; in-flight requests finish first."""
    _one_repository(repository)
    check_model_name(name)
    for key, value in parameters.items():
        if key != UNLOAD_DEPENDENTS:
            raise InvalidInputError(
                f"unknown unload parameter {key!r}; unload takes only {UNLOAD_DEPENDENTS!r}"
            )
        if not isinstance(value, bool):
            raise InvalidInputError(f"{UNLOAD_DEPENDENTS!r} must be true or false, got {value!r}")
    await core.models.unload(name)


def model_config(core: DataPlane, name: str, version: str = "") -> ModelConfiguration:
    """How version ``version`` of ``name`` (``""``: the one a request would get) is served."""
    check_model_name(name)
    served = core.models.version(name, version)
    metadata = core.model_metadata(name, str(served.version))
    return model_configuration(served, metadata, core.settings)


def statistics(core: DataPlane, name: str = "", version: str = "") -> list[ModelStatistics]:
    """Statistics of every loaded version (``name`` empty), of one model's, or of one."""
    if name:
        check_model_name(name)
    return core.models.statistics(name, version)


def model_configuration(
    served: ModelVersion, metadata: ModelMetadata, settings: Settings
) -> ModelConfiguration:
    """Triton's description of one served version: its config's batching section, with the
    server's settings for what it leaves unset (as the model manager starts the version's
    batcher), and the inputs and outputs of its metadata without the batch dimension."""
    batching = served.config.batching
    delay_ms = batching.max_batch_delay_ms
    if delay_ms is None:
        delay_ms = settings.max_batch_delay_ms
    timeout_ms = settings.default_timeout_ms
    # A request takes exactly one of a model's inputs, so each one alone may be left out.
    several = len(metadata.inputs) > 1
    return ModelConfiguration(
        name=metadata.name,
        platform=metadata.platform,
        backend=TRITON_BACKENDS.get(metadata.platform, metadata.platform),
        version_policy=_version_choice(served.config.version_policy),
        max_batch_size=batching.max_batch_size or settings.max_batch_size,
        inputs=tuple(_config_input(t, optional=several) for t in metadata.inputs),
        # Configurations list tensors without the batch dimension.
        outputs=tuple(ConfigTensor(t.name, t.datatype, t.shape[1:]) for t in metadata.outputs),
        max_queue_delay_us=round(delay_ms * 1000),
        # cnnserve counts queued items where Triton counts requests: the bound is on items.
        max_queue_size=batching.max_queue_size or settings.max_queue_size,
        default_timeout_us=0 if timeout_ms is None else round(timeout_ms * 1000),
    )


def _config_input(tensor: TensorMetadata, optional: bool) -> ConfigTensor:
    dims = tensor.shape[1:]
    image = tensor.datatype != "BYTES" and len(dims) == 3 and dims[0] == 3
    return ConfigTensor(
        tensor.name, tensor.datatype, dims, "NCHW" if image else "", optional=optional
    )


def _version_choice(policy: VersionPolicy) -> VersionChoice:
    if policy.all is not None:
        return VersionChoice("all")
    if policy.specific is not None:
        return VersionChoice("specific", versions=tuple(policy.specific.versions))
    return VersionChoice("latest", num_versions=(policy.latest or LatestPolicy()).num_versions)
