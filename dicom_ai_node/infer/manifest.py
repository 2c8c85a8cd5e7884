"""Model manifests: one `manifest.yaml` per model directory says what the model is and how to run it.

A manifest is the registry's unit: name, version, task, what it accepts, how its input is prepared
(orientation, spacing, intensity window), what it outputs (segments with SNOMED codes and colours, or
findings with thresholds), its weights with sha256, and the facts an admin needs before go-live
(licence, training data provenance, intended use, limits). Example: dicom_ai_node/models/ct-lung/.

Formats:
- `monai-unet`: weights are a state_dict (loaded with weights_only=True) for
  monai.networks.nets.UNet(**network); no code from the model directory is executed.
- `torchscript`: weights are a TorchScript archive (model.ts / model.pt) taking (N, C, *spatial).
- `monai-bundle`: the directory is a MONAI bundle (configs/metadata.json + configs/inference.json,
  models/model.pt or models/model.ts), loaded through monai.bundle with no network access; the manifest
  may be omitted and is then derived from metadata.json.
- `builtin`: a model class shipped in this package (`entry: module:Class`), e.g. deepbet or the
  classical lung baseline.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dicom_ai_node.domain.results import CodedConcept, FindingSpec, SegmentSpec
from dicom_ai_node.errors import ConfigError

MANIFEST_FILE = "manifest.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Strict):
    """A coded concept as written in YAML: {value: "3341006", scheme: SCT, meaning: Right lung}."""

    value: str
    scheme: str = "SCT"
    meaning: str

    def concept(self) -> CodedConcept:
        return CodedConcept(self.value, self.scheme, self.meaning)


class Intensity(_Strict):
    """Intensity preparation: clip to `window` (modality units, e.g. HU) then normalise.

    minmax: the window (or the volume's 0.5/99.5 percentiles without a window) maps to [0, 1];
    zscore: zero mean, unit variance over voxels inside the window; none: values as they are.
    """

    window: tuple[float, float] | None = None
    normalise: Literal["minmax", "zscore", "none"] = "minmax"


class InputSpec(_Strict):
    """The grid the network sees.

    `orientation` names the direction each network axis increases towards, nibabel style: RAS = axis 0
    towards the patient's Right, axis 1 Anterior, axis 2 Superior; LPS the DICOM patient directions.
    Reorientation is an axis permutation and flips only, so it is exactly undone. `native` keeps the DICOM
    order (frames, rows, cols) transposed to (cols, rows, frames). `spacing_mm` is the voxel size in mm per
    network axis; None keeps the source spacing. `size` resizes to a fixed shape instead (classifiers).
    """

    orientation: Literal["RAS", "LPS", "native"] = "RAS"
    spacing_mm: tuple[float, float, float] | None = None
    size: tuple[int, ...] | None = None
    intensity: Intensity = Field(default_factory=Intensity)
    channels: int = Field(1, ge=1)


class InferenceSpec(_Strict):
    """Sliding-window inference over the prepared volume (segmentation only)."""

    roi_size: tuple[int, int, int] | None = None
    overlap: float = Field(0.25, ge=0, lt=1)
    sw_batch_size: int = Field(1, ge=1)
    mode: Literal["gaussian", "constant"] = "gaussian"


class SegmentOut(_Strict):
    value: int = Field(ge=1, le=255)
    label: str
    category: Code = Code(value="91723000", scheme="SCT", meaning="Anatomical Structure")
    type: Code
    colour: tuple[int, int, int] = (255, 128, 0)

    def spec(self) -> SegmentSpec:
        return SegmentSpec(self.value, self.label, self.category.concept(), self.type.concept(), self.colour)


class FindingOut(_Strict):
    """One classifier output: `index` is the position in the network's output vector."""

    index: int = Field(ge=0)
    finding: Code
    threshold: float = Field(0.5, ge=0, le=1)

    def spec(self) -> FindingSpec:
        return FindingSpec(self.finding.concept(), self.threshold)


class Outputs(_Strict):
    segments: list[SegmentOut] = Field(default_factory=list)
    findings: list[FindingOut] = Field(default_factory=list)
    # How logits become probabilities: softmax over channels (segmentation, single-label classifiers)
    # or sigmoid per output (multi-label classifiers). `none`: the network already outputs probabilities.
    activation: Literal["softmax", "sigmoid", "none"] = "softmax"


class Weights(_Strict):
    """A weights file, relative to the model directory (or to `location`'s root) and its sha256."""

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # Where `file` lives: the model directory, or inside the deepbet wheel's data folder.
    location: Literal["model_dir", "deepbet"] = "model_dir"


class Accepts(_Strict):
    modalities: list[str]
    body_parts: list[str] = Field(default_factory=list)


class ModelManifest(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str
    task: Literal["segmentation", "classification"]
    format: Literal["monai-unet", "torchscript", "monai-bundle", "builtin"]
    description: str
    accepts: Accepts
    input: InputSpec = Field(default_factory=InputSpec)
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    outputs: Outputs = Field(default_factory=Outputs)
    weights: list[Weights] = Field(default_factory=list)
    # monai-unet: keyword arguments of monai.networks.nets.UNet; builtin: "module:Class".
    network: dict[str, Any] = Field(default_factory=dict)
    entry: str | None = None
    licence: str
    training_data: str
    intended_use: str
    limits: str = ""
    # Set by the loader, not written in YAML: the directory the manifest came from.
    directory: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelManifest:
        if self.task == "segmentation" and not self.outputs.segments:
            raise ValueError("a segmentation model needs outputs.segments")
        if self.task == "classification" and not self.outputs.findings:
            raise ValueError("a classification model needs outputs.findings")
        values = [s.value for s in self.outputs.segments]
        if len(values) != len(set(values)):
            raise ValueError("outputs.segments values must be unique")
        if self.format == "builtin" and not self.entry:
            raise ValueError("a builtin model needs entry: module:Class")
        if self.format == "monai-unet" and not self.network:
            raise ValueError("a monai-unet model needs network: (UNet keyword arguments)")
        if self.format in ("monai-unet", "torchscript") and not self.weights:
            raise ValueError(f"a {self.format} model needs weights")
        return self

    @property
    def segment_specs(self) -> list[SegmentSpec]:
        return [s.spec() for s in self.outputs.segments]

    @property
    def finding_specs(self) -> list[FindingSpec]:
        return [f.spec() for f in sorted(self.outputs.findings, key=lambda f: f.index)]

    def weights_path(self, weights: Weights) -> Path:
        if weights.location == "deepbet":
            from deepbet.utils import DATA_PATH  # deferred: deepbet imports torch

            return Path(DATA_PATH) / "models" / weights.file
        if self.directory is None:
            raise ConfigError(f"model {self.name}", f"manifest has no directory to resolve {weights.file}")
        return self.directory / weights.file


def read_manifest_mapping(file: Path) -> dict[str, Any] | None:
    """The YAML mapping in a manifest file, None when it is empty; ConfigError names the file."""
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(file), f"cannot read model manifest: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(str(file), f"not valid YAML: {exc}") from exc
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(str(file), "a model manifest must be a mapping")
    return raw


def load_manifest(path: Path) -> ModelManifest:
    """Read `path` (a manifest.yaml or a directory holding one); ConfigError names the file and key."""
    file = path / MANIFEST_FILE if path.is_dir() else path
    raw = read_manifest_mapping(file)
    if raw is None:
        raise ConfigError(str(file), "a model manifest must be a mapping")
    try:
        return ModelManifest.model_validate({**raw, "directory": file.parent.resolve()})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"{file}: {key}", str(first["msg"])) from exc


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_weights(manifest: ModelManifest) -> list[str]:
    """Problems with the weights (missing file, sha256 mismatch); an empty list means all verified."""
    problems: list[str] = []
    for weights in manifest.weights:
        path = manifest.weights_path(weights)
        if not path.is_file():
            problems.append(f"{weights.file}: missing ({path})")
            continue
        actual = sha256_of(path)
        if actual != weights.sha256:
            problems.append(f"{weights.file}: sha256 {actual} does not match the manifest's {weights.sha256}")
    return problems
