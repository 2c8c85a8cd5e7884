"""MONAI bundles from local disk, run through MONAI's own bundle API with no network access.

A bundle directory is what the MONAI model zoo ships and what `monai.bundle` exports:

    <bundle>/configs/metadata.json     name, version, description, licence facts, network_data_format
    <bundle>/configs/inference.json    the author's pipeline: preprocessing, network_def, inferer,
                                       postprocessing (Invertd, SaveImaged), evaluator, "run"/"evaluating"
    <bundle>/models/model.pt           a state_dict for network_def, and/or
    <bundle>/models/model.ts           the exported TorchScript network
    <bundle>/manifest.yaml             (the node's, optional) what a bundle does not say: SNOMED codes and
                                       colours per label, accepted modalities, licence, the weights' sha256

Its manifest comes from bundle_manifest.py (metadata.json with the node's manifest.yaml merged over it).

Running (`BundleModel`): `monai.bundle.ConfigWorkflow` reads inference.json + metadata.json with
`bundle_root`, `device`, `dataset_dir`, `datalist` and `output_dir` overridden, and is initialised once
(the bundle's "initialize" entries run once). The node loads the pinned network itself and puts it into
the config in place of `network` (bundle_network.py): the file read is the file whose sha256 was
verified, and it is read once. The evaluator is instantiated once and stays warm (network, inferer,
pre/postprocessing); per series only its data loader is replaced by one over the series' NIfTI
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
import logging
import os
import shutil
import sys
import tempfile
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dicom_ai_node.domain.results import ModelIdentity, SegmentSpec
from dicom_ai_node.errors import ConfigError, InferenceError
from dicom_ai_node.infer.bundle_manifest import METADATA_FILE, data_keys, inference_file
from dicom_ai_node.infer.bundle_network import (
    install_network,
    load_network,
    network_path,
    override_paths,
    remove_checkpoint_loaders,
)
from dicom_ai_node.infer.manifest import ModelManifest, verify_weights
from dicom_ai_node.infer.transfer import BUNDLE_WORKDIR_PREFIX
from dicom_ai_node.infer.volume import Volume, mask_from_nifti_grid, to_nifti_ras

log = logging.getLogger(__name__)

# Hub clients that MONAI or a bundle's network code may import: never reach out from the node.
for _variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_variable, "1")

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Affines equal to this (mm) are the same grid: NIfTI stores the affine as float32, so a source
# affine that went through a saved file differs in the 6th-7th significant digit.
_AFFINE_TOLERANCE_MM = 1e-3


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
        network_file = network_path(manifest)
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
                config_file=str(inference_file(bundle)),
                meta_file=str(bundle / METADATA_FILE),
                # A bundle's logging.conf would reconfigure the whole node's logging.
                logging_file=False,
                workflow_type="infer",
            )
            parser = workflow.parser
            override_paths(parser, bundle, workdir, resolved)
            checkpoint_keys = remove_checkpoint_loaders(parser)
            network = load_network(parser, network_file, checkpoint_keys, resolved)
            install_network(parser, network)
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
        return cls(manifest, workflow, evaluator, data_keys(bundle), workdir)

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
