"""MONAI bundles from local disk, run through MONAI's own bundle API with no network access.

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

Running (`BundleModel`): `monai.bundle.ConfigWorkflow` reads inference.json + metadata.json with
`bundle_root`, `device`, `dataset_dir`, `datalist` and `output_dir` overridden, and is initialised once
(the bundle's "initialize" entries run once). The node loads the pinned network itself (state_dict with
weights_only=True into the bundle's `network_def`, or the TorchScript archive), puts it into the config in
place of `network`, and removes the bundle's CheckpointLoader handlers: the file read is the file whose
sha256 was verified, and it is read once. The evaluator is instantiated once and stays warm (network,
inferer, pre/postprocessing); per series only its data loader is replaced by one over the series' NIfTI
(with the bundle dataset's own transform, so Invertd finds the very transforms it must undo), and the
bundle's "run" (or older "evaluating") entries run as `monai.bundle run` would. The result is the image
the bundle's SaveImaged wrote (else the evaluator's postprocessed `pred`), mapped onto the exact source
grid: as is when its affine and shape are the source's (bundles that Invertd, like the model zoo's
spleen_ct_segmentation), otherwise resampled by affine with nearest neighbour.

Nothing here downloads: no `monai.bundle.download`/`load`, hub libraries are put in offline mode, and the
bundle is read from its directory only. A bundle's configs are executable Python (MONAI evaluates `$`
expressions), so install bundles only from sources you trust, as you would install code.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError

from dicom_ai_node.domain.results import ModelIdentity, SegmentSpec
from dicom_ai_node.errors import ConfigError, InferenceError
from dicom_ai_node.infer.manifest import (
    MANIFEST_FILE,
    InferenceSpec,
    InputSpec,
    ModelManifest,
    Weights,
    read_manifest_mapping,
    verify_weights,
)
from dicom_ai_node.infer.transfer import BUNDLE_WORKDIR_PREFIX
from dicom_ai_node.infer.volume import Volume, mask_from_nifti_grid, to_nifti_ras

log = logging.getLogger(__name__)

# Hub clients that MONAI or a bundle's network code may import: never reach out from the node.
for _variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_variable, "1")

METADATA_FILE = Path("configs") / "metadata.json"
INFERENCE_FILES = (Path("configs") / "inference.json", Path("configs") / "inference.yaml")
NETWORK_FILES = ("models/model.pt", "models/model.ts")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Affines equal to this (mm) are the same grid: NIfTI stores the affine as float32, so a source
# affine that went through a saved file differs in the 6th-7th significant digit.
_AFFINE_TOLERANCE_MM = 1e-3
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
    metadata = _read_metadata(bundle)
    _inference_file(bundle)  # a bundle without its inference config cannot run: say so at discovery
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
    if not _pinned_network(manifest):
        log.warning(
            "MONAI bundle %s: no sha256 pinned for its network (%s): it loads, but `models verify` refuses it",
            manifest.name,
            " or ".join(NETWORK_FILES),
        )
    return manifest


def verify_bundle(manifest: ModelManifest) -> list[str]:
    """What stands between this bundle and go-live: unpinned network weights and any sha256 mismatch."""
    problems = verify_weights(manifest)
    if _pinned_network(manifest) is None:
        problems.append(
            f"no sha256 pinned for the network ({' or '.join(NETWORK_FILES)}): add weights: "
            f"[{{file: models/model.pt, sha256: ...}}] to {MANIFEST_FILE}"
        )
    return problems


class BundleModel:
    """A MONAI bundle's evaluator, instantiated once and run per series on a NIfTI of the volume."""

    task: Literal["segmentation"] = "segmentation"

    def __init__(
        self,
        manifest: ModelManifest,
        workflow: Any,
        evaluator: Any,
        keys: tuple[str, str],
        workdir: Path,
    ) -> None:
        self.manifest = manifest
        self.identity = ModelIdentity(manifest.name, manifest.version, description=manifest.description)
        self.segments: list[SegmentSpec] = manifest.segment_specs
        self.accepts_modalities = tuple(manifest.accepts.modalities)
        self._workflow = workflow
        self._evaluator = evaluator
        # The data keys of the network's input and output (metadata network_data_format), by
        # convention "image" and "pred".
        self._image_key, self._pred_key = keys
        self._workdir = workdir
        self._bundle_root = str(manifest.directory)
        self._lock = threading.Lock()
        weakref.finalize(self, shutil.rmtree, str(workdir), True)

    @classmethod
    def from_manifest(cls, manifest: ModelManifest, device: str = "auto") -> BundleModel:
        """Parse the bundle's inference config, load the verified network and instantiate the evaluator."""
        if manifest.directory is None:
            raise ConfigError(f"model {manifest.name}", "a monai-bundle manifest needs its bundle directory")
        bundle = manifest.directory
        problems = verify_weights(manifest)
        if problems:
            raise InferenceError(f"model {manifest.name}: weights not verified: {'; '.join(problems)}")
        network_file = _network_file(manifest)
        if importlib.util.find_spec("ignite") is None:  # MONAI's evaluators are ignite engines
            raise InferenceError(
                f"model {manifest.name}: MONAI bundle evaluators need pytorch-ignite (pip install pytorch-ignite)"
            )
        from monai.bundle import ConfigWorkflow

        from dicom_ai_node.infer.torch_model import resolve_device

        resolved = resolve_device(device)
        # The pid in the name lets the next inference process sweep what a killed one left behind.
        workdir = Path(tempfile.mkdtemp(prefix=f"{BUNDLE_WORKDIR_PREFIX}{os.getpid()}-{manifest.name}-"))
        (workdir / "in").mkdir()
        (workdir / "out").mkdir()
        try:
            workflow = ConfigWorkflow(
                config_file=str(_inference_file(bundle)),
                meta_file=str(bundle / METADATA_FILE),
                # A bundle's logging.conf would reconfigure the whole node's logging.
                logging_file=False,
                workflow_type="infer",
            )
            parser = workflow.parser
            _override(parser, bundle, workdir, resolved)
            checkpoint_keys = _remove_checkpoint_loaders(parser)
            network = _load_network(parser, network_file, checkpoint_keys, resolved)
            _install_network(parser, network)
            if "run" not in parser and "evaluating" in parser:
                workflow.run_id = "evaluating"  # bundles made before MONAI 1.2
            if workflow.run_id not in parser:
                raise ConfigError(
                    f"{bundle}: configs/inference.json", 'needs a "run" (or "evaluating") entry'
                )
            if (bundle / "scripts").is_dir() and str(bundle) not in sys.path:
                # Bundles import their own scripts/ package in `$` expressions, some while parsing;
                # appended (MONAI's own run prepends it only for the run) so that between runs a
                # bundle cannot shadow an installed package.
                sys.path.append(str(bundle))
            workflow.initialize()
            evaluator = parser.get_parsed_content("evaluator")
        except ConfigError:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        except Exception as exc:  # MONAI raises anything from a config: name the bundle and the cause
            shutil.rmtree(workdir, ignore_errors=True)
            raise InferenceError(
                f"model {manifest.name}: cannot instantiate MONAI bundle {bundle}: {exc}"
            ) from exc
        if not hasattr(evaluator, "data_loader") or not hasattr(evaluator, "state"):
            shutil.rmtree(workdir, ignore_errors=True)
            raise InferenceError(f"model {manifest.name}: the bundle's evaluator is not a MONAI engine")
        log.info(
            "MONAI bundle %s %s loaded on %s (%s)", manifest.name, manifest.version, resolved, network_file
        )
        return cls(manifest, workflow, evaluator, _data_keys(bundle), workdir)

    def segment(self, volume: Volume) -> np.ndarray:
        with self._lock:
            labels_xyz, affine_ras = self._run(volume)
        return self._on_source_grid(labels_xyz, affine_ras, volume)

    def _run(self, volume: Volume) -> tuple[np.ndarray, np.ndarray]:
        import nibabel as nib
        from monai.data import DataLoader, Dataset

        in_dir, out_dir = self._workdir / "in", self._workdir / "out"
        # A fresh name per run: SaveImaged names its output after the input, so nothing can be stale.
        source = in_dir / f"{uuid.uuid4().hex}.nii"  # uncompressed: written and read once
        bundle_loader = self._evaluator.data_loader
        transform = getattr(getattr(bundle_loader, "dataset", None), "transform", None)
        loader = DataLoader(
            Dataset(data=[{self._image_key: str(source)}], transform=transform),
            batch_size=1,
            shuffle=False,
            num_workers=0,  # no worker processes forked from a threaded server
            collate_fn=getattr(bundle_loader, "collate_fn", None),
        )
        self._evaluator.data_loader = loader
        self._evaluator.state.epoch_length = 1
        on_path = sys.path.count(self._bundle_root)
        try:
            nib.save(to_nifti_ras(volume), str(source))
            self._workflow.run()
            return self._read_result(out_dir)
        except InferenceError:
            raise
        except Exception as exc:
            raise InferenceError(
                f"model {self.manifest.name}: bundle run failed for series {volume.series_instance_uid}: {exc}"
            ) from exc
        finally:
            # ConfigWorkflow.run puts the bundle root first on sys.path at every run (for the bundle's
            # scripts/): take it out again, or the path grows per series and shadows installed packages.
            while sys.path.count(self._bundle_root) > on_path:
                sys.path.remove(self._bundle_root)
            self._evaluator.data_loader = bundle_loader
            self._evaluator.state.output = None
            self._evaluator.state.batch = None
            for directory in (in_dir, out_dir):
                for child in directory.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child)
                    else:
                        child.unlink()

    def _read_result(self, out_dir: Path) -> tuple[np.ndarray, np.ndarray]:
        """The saved label image (or the postprocessed `pred`) as (x, y, z) labels and its RAS affine."""
        import nibabel as nib

        saved = sorted(p for p in out_dir.rglob("*") if p.name.endswith((".nii", ".nii.gz")))
        if len(saved) > 1:
            raise InferenceError(
                f"model {self.manifest.name}: the bundle saved {len(saved)} images "
                f"({', '.join(p.name for p in saved)}); expected one label image"
            )
        if saved:
            image: Any = nib.load(str(saved[0]))
            return self._labels(np.asarray(image.dataobj)), np.asarray(image.affine, dtype=np.float64)
        # No SaveImaged (or it writes elsewhere): the evaluator's postprocessed output is the result.
        output = self._evaluator.state.output
        item = output[0] if isinstance(output, list) else output
        pred = item.get(self._pred_key) if isinstance(item, dict) else None
        if pred is None:
            raise InferenceError(
                f"model {self.manifest.name}: the bundle produced neither an image nor a pred"
            )
        affine = np.asarray(pred.affine, dtype=np.float64) if hasattr(pred, "affine") else np.eye(4)
        if str(getattr(pred, "meta", {}).get("space", "RAS")) == "LPS":
            affine = _LPS_TO_RAS @ affine
        array = np.asarray(pred.detach().cpu().numpy())
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        return self._labels(array), affine

    def _labels(self, array: np.ndarray) -> np.ndarray:
        """A 3-D integer label array whose values are all declared segments (or 0)."""
        squeezed = np.asarray(array)
        while squeezed.ndim > 3 and 1 in squeezed.shape[3:]:
            squeezed = np.squeeze(squeezed, axis=3 + squeezed.shape[3:].index(1))
        if squeezed.ndim != 3:
            raise InferenceError(
                f"model {self.manifest.name}: the bundle's output has shape {array.shape}, not one label "
                "image; its postprocessing needs AsDiscreted(argmax=True)"
            )
        labels: np.ndarray = np.rint(squeezed).astype(np.int64)
        declared = {0, *(s.label_value for s in self.segments)}
        undeclared = sorted(set(np.unique(labels).tolist()) - declared)
        if undeclared:
            raise InferenceError(
                f"model {self.manifest.name}: the bundle's output holds label values {undeclared} that "
                "outputs.segments does not declare"
            )
        return labels.astype(np.uint8)

    def _on_source_grid(self, labels: np.ndarray, affine_ras: np.ndarray, volume: Volume) -> np.ndarray:
        frames, rows, cols = volume.shape
        source_affine = _LPS_TO_RAS @ volume.affine_lps
        if labels.shape == (cols, rows, frames) and np.allclose(
            affine_ras, source_affine, rtol=0, atol=_AFFINE_TOLERANCE_MM
        ):
            return mask_from_nifti_grid(labels, volume)
        log.info(
            "model %s: bundle output %s is not on the source grid %s: resampling (nearest neighbour)",
            self.manifest.name,
            labels.shape,
            (cols, rows, frames),
        )
        return resample_nearest(labels, affine_ras, source_affine, volume.shape)


def resample_nearest(
    labels: np.ndarray, labels_affine: np.ndarray, source_affine: np.ndarray, shape: tuple[int, int, int]
) -> np.ndarray:
    """Labels (x, y, z) with voxel->world `labels_affine` sampled at each voxel of the source grid.

    `source_affine` maps source (col, row, frame) to the same world (RAS); the result is (frames, rows,
    cols) uint8, nearest neighbour, 0 outside the labels' field of view. Frame by frame, so memory is
    one frame of coordinates at a time.
    """
    frames, rows, cols = shape
    to_labels = np.linalg.inv(labels_affine) @ source_affine
    linear, offset = to_labels[:3, :3], to_labels[:3, 3]
    cols_idx = np.arange(cols, dtype=np.float64)[None, :]
    rows_idx = np.arange(rows, dtype=np.float64)[:, None]
    out = np.zeros((frames, rows, cols), dtype=np.uint8)
    bounds = np.asarray(labels.shape)
    for k in range(frames):
        coords = [
            np.floor(
                linear[a, 0] * cols_idx + linear[a, 1] * rows_idx + (linear[a, 2] * k + offset[a]) + 0.5
            ).astype(np.int64)
            for a in range(3)
        ]
        inside = np.ones((rows, cols), dtype=bool)
        for a in range(3):
            inside &= (coords[a] >= 0) & (coords[a] < bounds[a])
        out[k][inside] = labels[coords[0][inside], coords[1][inside], coords[2][inside]]
    return out


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


def _read_metadata(bundle: Path) -> dict[str, Any]:
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


def _inference_file(bundle: Path) -> Path:
    for name in INFERENCE_FILES:
        if (bundle / name).is_file():
            return bundle / name
    raise ConfigError(str(bundle / INFERENCE_FILES[0]), "the MONAI bundle has no inference config")


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


def _pinned_network(manifest: ModelManifest) -> Weights | None:
    for weights in manifest.weights:
        if weights.file.replace("\\", "/").lstrip("./") in NETWORK_FILES:
            return weights
    return None


def _network_file(manifest: ModelManifest) -> Path:
    """The pinned network file, else the bundle's own (model.pt before model.ts), with a warning."""
    assert manifest.directory is not None
    pinned = _pinned_network(manifest)
    if pinned is not None:
        return manifest.weights_path(pinned)
    for name in NETWORK_FILES:
        candidate = manifest.directory / name
        if candidate.is_file():
            log.warning(
                "MONAI bundle %s: %s has no sha256 pinned in %s; loading it unverified (`models verify` "
                "refuses this bundle)",
                manifest.name,
                name,
                MANIFEST_FILE,
            )
            return candidate
    raise InferenceError(f"model {manifest.name}: the bundle has no {' or '.join(NETWORK_FILES)}")


def _override(parser: Any, bundle: Path, workdir: Path, device: str) -> None:
    """Point the bundle at itself, the node's device and the node's scratch directories."""
    import torch

    parser["bundle_root"] = str(bundle)
    parser["device"] = torch.device(device)
    parser["dataset_dir"] = str(workdir / "in")
    parser["output_dir"] = str(workdir / "out")
    if "datalist" in parser:
        # The instantiated loader is replaced per series: it must not glob anything at load.
        parser["datalist"] = []
    if (
        "dataloader" in parser
        and isinstance(parser["dataloader"], dict)
        and "num_workers" in parser["dataloader"]
    ):
        parser["dataloader::num_workers"] = 0


def _remove_checkpoint_loaders(parser: Any) -> list[str]:
    """Drop CheckpointLoader handlers from the config; return the load_dict keys they used.

    The node loads the sha256-verified file itself, once; a CheckpointLoader would read the file again
    at every run (and a model.ts-only bundle's loader points at a model.pt that is not there).
    """
    keys: list[str] = []

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items()}
        if isinstance(node, list):
            kept = []
            for item in node:
                target = item.get("_target_") if isinstance(item, dict) else None
                if isinstance(target, str) and target.rsplit(".", 1)[-1] == "CheckpointLoader":
                    load_dict = item.get("load_dict")
                    if isinstance(load_dict, dict):
                        keys.extend(str(k) for k in load_dict)
                    continue
                kept.append(strip(item))
            return kept
        return node

    parser.set(strip(parser.get()))
    return keys


def _load_network(parser: Any, network_file: Path, checkpoint_keys: list[str], device: str) -> Any:
    import torch

    from dicom_ai_node.infer.torch_model import load_torchscript

    if network_file.suffix == ".ts":
        network: Any = load_torchscript(network_file)
    else:
        if "network_def" not in parser:
            raise ConfigError(
                f"{network_file.parent.parent}: configs/inference.json",
                "a bundle with models/model.pt needs network_def (or ship models/model.ts)",
            )
        network = parser.get_parsed_content("network_def")
        # weights_only: a state_dict is tensors only, so a tampered file cannot run code on load.
        checkpoint = torch.load(network_file, map_location="cpu", weights_only=True)
        network.load_state_dict(_state_dict(checkpoint, checkpoint_keys))
    return network.to(device).eval()


def _state_dict(checkpoint: Any, keys: list[str]) -> Any:
    """The network's state_dict inside a checkpoint, the way MONAI's CheckpointLoader finds it."""
    if isinstance(checkpoint, dict):
        for key in (*keys, "model", "state_dict"):
            inner = checkpoint.get(key)
            if isinstance(inner, dict):
                return inner
    return checkpoint


def _install_network(parser: Any, network: Any) -> None:
    """Put the loaded network where the evaluator takes it from (`@network` or its own argument)."""
    evaluator = parser["evaluator"] if "evaluator" in parser else None
    if not isinstance(evaluator, dict):
        raise ConfigError("configs/inference.json: evaluator", "the bundle needs an evaluator to run")
    reference = evaluator.get("network")
    if isinstance(reference, str) and reference.startswith("@") and reference[1:] in parser:
        parser[reference[1:]] = network
    else:
        parser["evaluator::network"] = network
    if "network" in parser:
        # Anything else that refers to @network (custom handlers) gets the same warm instance.
        parser["network"] = network


def _data_keys(bundle: Path) -> tuple[str, str]:
    """The data keys of the network input and output (network_data_format), "image" and "pred" by default."""
    formats = _read_metadata(bundle).get("network_data_format") or {}
    keys = []
    for side, default in (("inputs", "image"), ("outputs", "pred")):
        entries = formats.get(side) if isinstance(formats, dict) else None
        keys.append(str(next(iter(entries))) if isinstance(entries, dict) and entries else default)
    return keys[0], keys[1]
