"""A model repository: one folder per model, one sub-folder per version, one config per model.

The layout follows Triton's, so its users find their way::

    repository/
      convnet/                 the model's name (letters, digits, ``_ . -``)
        config.yaml            what the model is and how to serve it (ModelConfig)
        1/                     a version: a positive integer
          model.pt             TorchScript
          model.onnx           ONNX
          export.json          what was exported: classes, labels, checksums, parity
        2/
          ...

``cnnserve export --repository DIR`` writes all of it. A config may be written by hand too: it
is YAML (so JSON works as well), validated field by field, and whatever it leaves out takes the
defaults below. Reading never raises for one bad model or version: the reason is kept on the
entry (:attr:`ModelEntry.errors`), so every other model still serves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from cnnserve.errors import InvalidInputError, UnknownModelError

from .features import FEATURE_LAYERS
from .imaging import resize_rgb
from .pixels import Normalization
from .spec import FCN_MAX_SIDE, FCN_MIN_SIDE, Architecture, ModelSpec
from .steps import CONVNET_SIDE, digit_pixels, to_chw

CONFIG_FILE = "config.yaml"
EXPORT_FILE = "export.json"
#: Artifact file of each format inside a version folder.
ARTIFACT_FILES = {"torchscript": "model.pt", "onnx": "model.onnx"}
#: The largest FCN side a config may allow: activations grow with H×W (≈ 0.5 GB at 1024²).
FCN_SIDE_LIMIT = 1024
MAX_NAME_LENGTH = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class RepositoryError(Exception):
    """A repository file that cannot be used; the message names the file and the field."""


def check_model_name(name: str) -> str:
    """``name`` if it is a safe folder name; else :class:`InvalidInputError` saying why.

    Names reach the file system, so anything that could leave the repository (``..``, ``/``,
    NUL) or be mistaken for something else (a leading dot or dash) is refused.
    """
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInputError(
            f"model name is {len(name)} characters long; at most {MAX_NAME_LENGTH} are allowed"
        )
    if not _NAME.fullmatch(name) or ".." in name:
        raise InvalidInputError(
            f"model name {name!r} is not allowed: use letters, digits, '_', '.' and '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputConfig(_Section):
    """Input sizes: the ConvNet takes 28×28 (any image is brought to it); the FCN any side in
    ``[min_side, max_side]`` (its images are never resized: the mask must line up)."""

    min_side: int = Field(FCN_MIN_SIDE, ge=FCN_MIN_SIDE)
    max_side: int = Field(FCN_MAX_SIDE, ge=FCN_MIN_SIDE, le=FCN_SIDE_LIMIT)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} is larger than max_side {self.max_side}")
        return self


class NormalizationConfig(_Section):
    """``(pixel / 255 - mean) / std`` for every channel."""

    mean: float = 0.5
    std: float = Field(0.5, gt=0)


class Preprocessing(_Section):
    """What happens to a decoded image before the network sees it."""

    normalize: NormalizationConfig = NormalizationConfig()
    #: ConvNet only: invert dark-on-light, crop to the ink, fit it in 20 px centred in 28×28
    #: (as the demo digits were trained). Off: the image is only resized to 28×28.
    center_digit: bool = True


class Batching(_Section):
    """Per-model batching; an unset field takes the server's setting of the same name."""

    max_batch_size: int | None = Field(None, ge=1, le=4096)
    max_batch_delay_ms: float | None = Field(None, ge=0, le=10_000)
    max_queue_size: int | None = Field(None, ge=1)


class LatestPolicy(_Section):
    """Serve the ``num_versions`` highest versions."""

    num_versions: int = Field(1, ge=1)


class AllPolicy(_Section):
    """Serve every version."""


class SpecificPolicy(_Section):
    """Serve the versions listed."""

    versions: list[int] = Field(min_length=1)

    @model_validator(mode="after")
    def _positive(self) -> Self:
        if any(v < 1 for v in self.versions):
            raise ValueError("versions are positive integers")
        return self


class VersionPolicy(_Section):
    """Which versions are served, as Triton's ``version_policy``: exactly one of ``latest``,
    ``all`` or ``specific``; none written means the latest one."""

    latest: LatestPolicy | None = None
    all: AllPolicy | None = None
    specific: SpecificPolicy | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        chosen = [p for p in (self.latest, self.all, self.specific) if p is not None]
        if len(chosen) > 1:
            raise ValueError("give one of latest, all or specific")
        return self

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of ``available``, ascending."""
        ordered = sorted(available)
        if self.all is not None:
            return ordered
        if self.specific is not None:
            return [v for v in ordered if v in self.specific.versions]
        keep = (self.latest or LatestPolicy()).num_versions
        return ordered[-keep:]


class ModelConfig(_Section):
    """One model's ``config.yaml``. Only ``architecture`` is required."""

    architecture: Architecture
    #: Classes the network outputs; default: from ``labels``, else from each version's export.
    num_classes: int | None = Field(None, ge=1, le=4096)
    #: One label per class; default ``"0"`` … ``"N-1"``.
    labels: list[str] | None = None
    input: InputConfig = InputConfig()
    preprocessing: Preprocessing = Preprocessing()
    batching: Batching = Batching()
    version_policy: VersionPolicy = VersionPolicy()
    #: Artifact the in-process and TorchServe backends load: ``torchscript`` or ``onnx``
    #: (default: the server's ``artifact_format`` setting, where a backend has one).
    artifact_format: Literal["torchscript", "onnx"] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.labels is not None:
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels must be distinct")
            if self.num_classes is not None and len(self.labels) != self.num_classes:
                raise ValueError(
                    f"{len(self.labels)} labels for num_classes {self.num_classes}; give one "
                    "label per class"
                )
        if self.architecture is Architecture.CONVNET and "input" in self.model_fields_set:
            raise ValueError("the convnet input is fixed at 28×28; leave 'input' out")
        if self.architecture is Architecture.FCN and "center_digit" in (
            self.preprocessing.model_fields_set
        ):
            raise ValueError("preprocessing.center_digit applies to the convnet only")
        return self

    def class_count(self) -> int | None:
        """The number of classes the config fixes, if it fixes one."""
        if self.num_classes is not None:
            return self.num_classes
        return None if self.labels is None else len(self.labels)

    def label_tuple(self, num_classes: int) -> tuple[str, ...]:
        """The labels for ``num_classes`` classes (the config's, else ``"0"``…)."""
        if self.labels is not None:
            return tuple(self.labels)
        return tuple(str(i) for i in range(num_classes))


def _location(error: ErrorDetails) -> str:
    return ".".join(str(part) for part in error["loc"]) or "(top level)"


def parse_config(data: Any, source: str) -> ModelConfig:
    """Validate a config's parsed content; errors name ``source`` and each field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RepositoryError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{_location(e)}: {e['msg']}" for e in exc.errors())
        raise RepositoryError(f"{source}: {problems}") from None


def read_config(path: Path) -> ModelConfig:
    """Read and validate a ``config.yaml``."""
    # YAML is imported where configs are read and written: the client and ``cnnserve
    # predict`` use the demo models' specs from this module without PyYAML installed.
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RepositoryError(f"{path}: missing; every model folder needs one") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RepositoryError(f"{path}: cannot be read: {first}") from None
    return parse_config(data, str(path))


def write_config(path: Path, config: ModelConfig) -> None:
    """Write ``config`` as YAML, only the fields that differ from the defaults."""
    import yaml  # see read_config

    data = config.model_dump(mode="json", exclude_defaults=True)
    data["architecture"] = config.architecture.value
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _fixed_digit(rgb: np.ndarray) -> np.ndarray:
    # Without digit centring a ConvNet image is only brought to the network's size.
    return to_chw(resize_rgb(np.ascontiguousarray(rgb), CONVNET_SIDE, CONVNET_SIDE))


def _as_is(rgb: np.ndarray) -> np.ndarray:
    # Segmentation masks must line up with the input, so FCN images are never resized.
    return to_chw(rgb)


def build_spec(
    name: str, config: ModelConfig, num_classes: int, feature_layers: tuple[str, ...] = ()
) -> ModelSpec:
    """The serving side's :class:`ModelSpec` for one model version; ``feature_layers``: the
    feature maps its artifacts offer (:mod:`.features`)."""
    labels = config.label_tuple(num_classes)
    if len(labels) != num_classes:
        raise RepositoryError(
            f"{name}: {len(labels)} labels in the config but the network has {num_classes} classes"
        )
    norm = Normalization(config.preprocessing.normalize.mean, config.preprocessing.normalize.std)
    if config.architecture is Architecture.CONVNET:
        return ModelSpec(
            name=name,
            architecture=config.architecture,
            labels=labels,
            fixed_size=(CONVNET_SIDE, CONVNET_SIDE),
            min_side=CONVNET_SIDE,
            max_side=CONVNET_SIDE,
            rgb_to_pixels=digit_pixels if config.preprocessing.center_digit else _fixed_digit,
            input_name="input",
            output_name="logits",
            normalization=norm,
            feature_layers=feature_layers,
        )
    return ModelSpec(
        name=name,
        architecture=config.architecture,
        labels=labels,
        fixed_size=None,
        min_side=config.input.min_side,
        max_side=config.input.max_side,
        rgb_to_pixels=_as_is,
        input_name="input",
        output_name="scores",
        normalization=norm,
        feature_layers=feature_layers,
    )


@dataclass(frozen=True)
class ModelVersion:
    """One loadable version: its spec and the folder holding its artifacts."""

    spec: ModelSpec
    config: ModelConfig
    version: int
    path: Path

    def artifact(self, artifact_format: str) -> Path:
        """The version's artifact file of ``artifact_format`` (it may not exist)."""
        return self.path / ARTIFACT_FILES[artifact_format]


@dataclass(frozen=True)
class ModelEntry:
    """One model folder as read: its config and versions, and why any part can't be used."""

    name: str
    config: ModelConfig | None
    #: Every version whose folder is usable, by number.
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    #: What could not be used and why: ``"config"``, or a version number as text.
    errors: dict[str, str] = field(default_factory=dict)

    def served(self) -> list[ModelVersion]:
        """The versions the config's policy selects, ascending."""
        if self.config is None:
            return []
        chosen = self.config.version_policy.select(list(self.versions))
        return [self.versions[v] for v in chosen]


def read_export(path: Path) -> dict[str, Any]:
    """A version's ``export.json``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RepositoryError(f"{path}: missing; export the version with cnnserve export") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RepositoryError(f"{path}: cannot be read: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("num_classes"), int):
        raise RepositoryError(f"{path}: num_classes: missing or not an integer")
    return data


def exported_spec(name: str, config: ModelConfig, export: dict[str, Any], where: Path) -> ModelSpec:
    """The spec of a version exported as ``export`` (its ``export.json``) under ``config``,
    checked against each other; ``where`` (the version's folder, or an unpacked TorchServe
    archive) names the place in errors."""
    if export.get("architecture") != config.architecture.value:
        raise RepositoryError(
            f"{where}: exported as {export.get('architecture')!r} but config.yaml says "
            f"{config.architecture.value!r}"
        )
    num_classes = int(export["num_classes"])
    fixed = config.class_count()
    if fixed is not None and fixed != num_classes:
        raise RepositoryError(
            f"{where}: the network has {num_classes} classes but config.yaml says {fixed}"
        )
    return build_spec(name, config, num_classes, _feature_layers(export, config, where))


def _feature_layers(export: dict[str, Any], config: ModelConfig, where: Path) -> tuple[str, ...]:
    """The feature maps an ``export.json`` says its artifacts offer (none before they were
    exported), checked against the architecture's."""
    listed = export.get("feature_outputs", [])
    known = FEATURE_LAYERS[config.architecture]
    names: tuple[str, ...] = (
        tuple(str(item.get("name")) for item in listed if isinstance(item, dict))
        if isinstance(listed, list)
        else ()
    )
    if not isinstance(listed, list) or len(names) != len(listed) or set(names) - set(known):
        raise RepositoryError(
            f"{where}: feature_outputs must list feature maps of a {config.architecture.value} "
            f"({', '.join(known)})"
        )
    return names


def _read_version(name: str, config: ModelConfig, folder: Path) -> ModelVersion:
    spec = exported_spec(name, config, read_export(folder / EXPORT_FILE), folder)
    if not any((folder / f).is_file() for f in ARTIFACT_FILES.values()):
        raise RepositoryError(f"{folder}: holds no {' or '.join(ARTIFACT_FILES.values())}")
    return ModelVersion(spec=spec, config=config, version=int(folder.name), path=folder)


def version_folders(model_dir: Path) -> Iterator[Path]:
    """The sub-folders of a model folder named as versions (positive integers)."""
    for child in sorted(model_dir.iterdir()):
        name = child.name
        if child.is_dir() and name.isdigit() and name == str(int(name)) and int(name) > 0:
            yield child


class Repository:
    """A repository folder, read on demand (the server decides when: at start, on poll, on a
    load call)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        """Every folder that could be a model, valid name or not, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(child.name for child in self.root.iterdir() if child.is_dir())

    def read(self, name: str) -> ModelEntry:
        """One model's entry; :class:`UnknownModelError` when there is no such folder."""
        check_model_name(name)
        model_dir = self.root / name
        if not model_dir.is_dir():
            raise UnknownModelError(f"the repository has no model {name!r}")
        try:
            config = read_config(model_dir / CONFIG_FILE)
        except RepositoryError as exc:
            return ModelEntry(name, None, errors={"config": str(exc)})
        versions: dict[int, ModelVersion] = {}
        errors: dict[str, str] = {}
        for folder in version_folders(model_dir):
            try:
                versions[int(folder.name)] = _read_version(name, config, folder)
            except RepositoryError as exc:
                errors[folder.name] = str(exc)
        return ModelEntry(name, config, versions, errors)

    def read_all(self) -> dict[str, ModelEntry]:
        """Every model of the repository; a folder with an unsafe name is reported, not read."""
        entries: dict[str, ModelEntry] = {}
        for name in self.names():
            try:
                entries[name] = self.read(name)
            except InvalidInputError as exc:
                entries[name] = ModelEntry(name, None, errors={"config": str(exc)})
        return entries
