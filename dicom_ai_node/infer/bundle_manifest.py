"""MONAI bundles from local disk: the node's manifest of a bundle directory, and its go-live check.

A bundle directory is what the MONAI model zoo ships and what `monai.bundle` exports:

    <bundle>/configs/metadata.json     name, version, description, licence facts, network_data_format
    <bundle>/configs/inference.json    the author's pipeline: preprocessing, network_def, inferer,
                                       postprocessing (Invertd, SaveImaged), evaluator, "run"/"evaluating"
    <bundle>/models/model.pt           a state_dict for network_def, and/or
    <bundle>/models/model.ts           the exported TorchScript network
    <bundle>/manifest.yaml             (the node's, optional) what a bundle does not say: SNOMED codes and
                                       colours per label, accepted modalities, licence, the weights' sha256

The manifest (`manifest_from_bundle`): metadata.json gives name (the directory name), version, task,
description, intended use, training data and the label names (`channel_def` of the first output);
`manifest.yaml` next to configs/ is merged over that and wins. Decisions, all deliberate:
- SNOMED codes are never invented. A bundle's metadata names its labels ("spleen") but has no coding
  convention, and a DICOM SEG needs a coded Segmented Property Type whose meaning is the code's own; a
  generic code ("Tissue") with the label as meaning would be a miscoded SEG that a PACS would file
  wrongly. So a label without a code is a ConfigError that names the manifest.yaml keys to add.
- sha256: bundle metadata has no checksum convention, so manifest.yaml pins the weights (and may pin
  configs/inference.json too: its `$` expressions are Python run by MONAI, i.e. code). An unpinned bundle
  still loads, with a warning at every load, so a team can try it on a test node; `verify_bundle` (the
  check for `dicom-ai-node models verify` to run on bundles) refuses it: go-live needs a clean verify.
- Only segmentation bundles: a classifier is added as TorchScript with a manifest (docs/user-models.md).

The network itself is loaded by bundle_network.py and run by bundle.py (`BundleModel`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dicom_ai_node.errors import ConfigError
from dicom_ai_node.infer.manifest import (
    MANIFEST_FILE,
    InferenceSpec,
    InputSpec,
    ModelManifest,
    Weights,
    read_manifest_mapping,
    verify_weights,
)

log = logging.getLogger(__name__)

METADATA_FILE = Path("configs") / "metadata.json"
INFERENCE_FILES = (Path("configs") / "inference.json", Path("configs") / "inference.yaml")
NETWORK_FILES = ("models/model.pt", "models/model.ts")
# Manifest keys that describe the node's own input preparation: a bundle does its own.
_NOT_FOR_BUNDLES = ("input", "inference", "network", "entry")
_NODE_SPECS: dict[str, type[InputSpec] | type[InferenceSpec]] = {
    "input": InputSpec,
    "inference": InferenceSpec,
}
# Default colours for labels whose manifest.yaml entry gives none (distinct, readable on grey).
_PALETTE = ((255, 128, 0), (80, 180, 250), (250, 200, 80), (120, 220, 120), (230, 100, 200), (160, 120, 255))


def manifest_from_bundle(path: Path) -> ModelManifest:
    """The manifest of the bundle in `path`: configs/metadata.json, with manifest.yaml merged over it.

    ConfigError names the file and the keys to add when something the node must know is missing (codes
    for the labels, accepted modalities, licence) or the bundle is incomplete.
    """
    bundle = Path(path).resolve()
    metadata = read_metadata(bundle)
    inference_file(bundle)  # a bundle without its inference config cannot run: say so at discovery
    overlay = _read_overlay(bundle)
    for key in _NOT_FOR_BUNDLES:
        # A complete manifest (e.g. one written from `models show`) carries the defaults: those are fine.
        if _sets_node_key(key, overlay.get(key)):
            raise ConfigError(
                f"{bundle / MANIFEST_FILE}: {key}",
                "a MONAI bundle prepares its input with its own configs/inference.json; remove this key",
            )
    outputs = _first_output(metadata)
    labels = _channel_labels(outputs)
    base: dict[str, Any] = {
        "name": _slug(bundle.name),
        "version": str(metadata.get("version", "")),
        "task": _task(outputs),
        "format": "monai-bundle",
        "description": str(metadata.get("description") or metadata.get("name") or bundle.name),
        "training_data": str(metadata.get("data_source") or "not stated in configs/metadata.json"),
        "intended_use": str(metadata.get("intended_use") or "not stated in configs/metadata.json"),
    }
    licence = metadata.get("license") or metadata.get("licence")
    if licence:
        base["licence"] = str(licence)
    modality = _input_modality(metadata)
    if modality:
        base["accepts"] = {"modalities": [modality]}
    merged = {**base, **{k: v for k, v in overlay.items() if k != "outputs"}}
    merged["outputs"] = _merge_outputs(labels, overlay.get("outputs") or {})
    # The bundle's postprocessing turns logits into labels; the node applies no activation of its own.
    merged["outputs"].setdefault("activation", "none")

    missing = _missing_keys(merged, labels)
    if missing:
        raise ConfigError(
            str(bundle / MANIFEST_FILE),
            f"MONAI bundle {bundle.name}: configs/metadata.json does not say {'; '.join(missing)}. "
            f"Add them in {MANIFEST_FILE} next to configs/ (see docs/user-models.md); the node does not "
            "invent SNOMED codes.",
        )
    try:
        manifest = ModelManifest.model_validate({**merged, "directory": bundle})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"{bundle / MANIFEST_FILE}: {key}", str(first["msg"])) from exc
    if manifest.task != "segmentation":
        raise ConfigError(
            f"{bundle / MANIFEST_FILE}: task",
            "only segmentation bundles run as bundles; export a classifier as TorchScript with a manifest",
        )
    if not pinned_network(manifest):
        log.warning(
            "MONAI bundle %s: no sha256 pinned for its network (%s): it loads, but `models verify` refuses it",
            manifest.name,
            " or ".join(NETWORK_FILES),
        )
    return manifest


def verify_bundle(manifest: ModelManifest) -> list[str]:
    """What stands between this bundle and go-live: unpinned network weights and any sha256 mismatch."""
    problems = verify_weights(manifest)
    if pinned_network(manifest) is None:
        problems.append(
            f"no sha256 pinned for the network ({' or '.join(NETWORK_FILES)}): add weights: "
            f"[{{file: models/model.pt, sha256: ...}}] to {MANIFEST_FILE}"
        )
    return problems


def pinned_network(manifest: ModelManifest) -> Weights | None:
    for weights in manifest.weights:
        if weights.file.replace("\\", "/").lstrip("./") in NETWORK_FILES:
            return weights
    return None


def inference_file(bundle: Path) -> Path:
    for name in INFERENCE_FILES:
        if (bundle / name).is_file():
            return bundle / name
    raise ConfigError(str(bundle / INFERENCE_FILES[0]), "the MONAI bundle has no inference config")


def read_metadata(bundle: Path) -> dict[str, Any]:
    file = bundle / METADATA_FILE
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(file), f"cannot read MONAI bundle metadata: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(str(file), f"not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(str(file), "bundle metadata must be a JSON object")
    return raw


def data_keys(bundle: Path) -> tuple[str, str]:
    """The data keys of the network input and output (network_data_format), "image" and "pred" by default."""
    formats = read_metadata(bundle).get("network_data_format") or {}
    keys = []
    for side, default in (("inputs", "image"), ("outputs", "pred")):
        entries = formats.get(side) if isinstance(formats, dict) else None
        keys.append(str(next(iter(entries))) if isinstance(entries, dict) and entries else default)
    return keys[0], keys[1]


def _sets_node_key(key: str, value: Any) -> bool:
    """Whether manifest.yaml sets `key` to something other than its default (which a bundle ignores)."""
    if value in (None, {}, ""):
        return False
    spec = _NODE_SPECS.get(key)
    if spec is None:
        return True
    try:
        return bool(spec.model_validate(value) != spec())
    except ValidationError:
        return True


def _read_overlay(bundle: Path) -> dict[str, Any]:
    file = bundle / MANIFEST_FILE
    if not file.is_file():
        return {}
    raw = read_manifest_mapping(file)
    if raw is None:
        return {}
    if raw.get("format", "monai-bundle") != "monai-bundle":
        raise ConfigError(f"{file}: format", "a bundle directory's manifest must say format: monai-bundle")
    return raw


def _first_output(metadata: dict[str, Any]) -> dict[str, Any]:
    outputs = (metadata.get("network_data_format") or {}).get("outputs") or {}
    if not isinstance(outputs, dict) or not outputs:
        return {}
    first = next(iter(outputs.values()))
    return first if isinstance(first, dict) else {}


def _channel_labels(output: dict[str, Any]) -> dict[int, str]:
    """Label value -> name from the output's channel_def, background (channel 0) left out."""
    channel_def = output.get("channel_def") or {}
    labels: dict[int, str] = {}
    for key, name in channel_def.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            continue
        if value > 0:
            labels[value] = str(name)
    return labels


def _task(output: dict[str, Any]) -> str:
    kind = str(output.get("format", "segmentation")).lower()
    return "classification" if kind in ("classification", "probabilities", "class") else "segmentation"


def _input_modality(metadata: dict[str, Any]) -> str:
    inputs = (metadata.get("network_data_format") or {}).get("inputs") or {}
    for spec in inputs.values() if isinstance(inputs, dict) else ():
        modality = spec.get("modality") if isinstance(spec, dict) else None
        # "CT", "MR", "MRI": DICOM says MR.
        if isinstance(modality, str) and modality.strip():
            upper = modality.strip().upper()
            return "MR" if upper in ("MRI", "MR") else upper
    return ""


def _merge_outputs(labels: dict[int, str], overlay: dict[str, Any]) -> dict[str, Any]:
    """outputs from manifest.yaml, each segment's label defaulting to the bundle's channel name."""
    merged = dict(overlay)
    segments: list[dict[str, Any]] = []
    for index, entry in enumerate(overlay.get("segments") or []):
        segment = dict(entry) if isinstance(entry, dict) else entry
        if isinstance(segment, dict):
            value = segment.get("value")
            if "label" not in segment and isinstance(value, int) and value in labels:
                segment["label"] = labels[value]
            segment.setdefault("colour", list(_PALETTE[index % len(_PALETTE)]))
        segments.append(segment)
    merged["segments"] = segments
    return merged


def _missing_keys(merged: dict[str, Any], labels: dict[int, str]) -> list[str]:
    missing: list[str] = []
    coded = {s.get("value") for s in merged["outputs"]["segments"] if isinstance(s, dict) and s.get("type")}
    uncoded = [f"{value} ({name})" for value, name in sorted(labels.items()) if value not in coded]
    if uncoded:
        missing.append(
            "the SNOMED code of label " + ", ".join(uncoded) + " (outputs.segments: - {value: N, type: "
            "{value: <SCT code>, scheme: SCT, meaning: <code meaning>}, colour: [r, g, b]})"
        )
    if not labels and not merged["outputs"]["segments"]:
        missing.append("which labels it outputs (outputs.segments with value, label and SNOMED type)")
    if not merged.get("version"):
        missing.append('its version (version: "1.0.0")')
    if not merged.get("accepts"):
        missing.append("which modalities it accepts (accepts: {modalities: [CT]})")
    if not merged.get("licence"):
        missing.append("its licence (licence: ...)")
    return missing


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return slug or "bundle"
