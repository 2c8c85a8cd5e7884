"""`mr-brain`: brain extraction on T1-weighted MR with deepbet's pretrained CNN.

deepbet (https://github.com/wwu-mmll/deepbet, MIT licence, Fisch et al. 2024) ships two TorchScript
3-D U-Nets inside its wheel (`deepbet.utils.DATA_PATH/models`: a 128^3 bounding-box model and a 256^3
mask model); nothing is downloaded. Its `BrainExtraction.run` takes a NIfTI image, works in the closest
canonical (RAS) orientation and returns the mask reoriented back onto the input image's own voxel grid,
so the mask maps back to the DICOM grid by a transpose only (see volume.to_nifti_ras).
"""

from __future__ import annotations

import importlib.metadata
import threading
import warnings
from pathlib import Path
from typing import Literal

import numpy as np

from dicom_ai_node.domain.results import ModelIdentity
from dicom_ai_node.errors import InferenceError
from dicom_ai_node.infer.manifest import ModelManifest, sha256_of, verify_weights
from dicom_ai_node.infer.volume import Volume, mask_from_nifti_grid, to_nifti_ras

BRAIN_LABEL = 1


def _deepbet_version() -> str:
    try:
        return importlib.metadata.version("deepbet")
    except importlib.metadata.PackageNotFoundError:
        return "1.0.2"


class DeepbetBrainModel:
    """Warm deepbet model; `segment` is serialised because BrainExtraction keeps per-call state."""

    task: Literal["segmentation"] = "segmentation"
    accepts_modalities: tuple[str, ...] = ("MR",)

    def __init__(self, manifest: ModelManifest, device: str = "cpu") -> None:
        # deepbet imports torch: keep it out of module import so the registry stays cheap to build.
        from deepbet.bet import BrainExtraction
        from deepbet.utils import DATA_PATH

        model_path = Path(DATA_PATH) / "models" / "model.pt"
        bbox_model_path = Path(DATA_PATH) / "models" / "bbox_model.pt"
        problems = verify_weights(manifest)
        if problems:
            raise InferenceError(
                f"deepbet weights not verified ({'; '.join(problems)}): reinstall the deepbet wheel"
            )
        self.weights_sha256 = sha256_of(model_path)
        # no_gpu=False lets deepbet pick its own accelerator (CUDA/MPS) when the caller asked for one.
        with warnings.catch_warnings():
            # torch 2.13 deprecates torch.jit.load, which deepbet uses for its TorchScript weights.
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
            self._bet = BrainExtraction(
                no_gpu=not device.startswith("cuda"),
                model_path=str(model_path),
                bbox_model_path=str(bbox_model_path),
            )
        self._lock = threading.Lock()
        self.device = device
        self.identity = ModelIdentity(
            name=manifest.name,
            version=manifest.version,
            description=f"{manifest.description}, deepbet {_deepbet_version()}, weights sha256 {self.weights_sha256[:16]}",
        )
        self.segments = manifest.segment_specs
        if [s.label_value for s in self.segments] != [BRAIN_LABEL]:
            raise InferenceError(
                f"model {manifest.name}: deepbet outputs one segment with value {BRAIN_LABEL}"
            )

    def segment(self, volume: Volume) -> np.ndarray:
        image = to_nifti_ras(volume)
        with self._lock:
            try:
                _, mask_image, _ = self._bet.run(image)
            except AssertionError as exc:
                # deepbet asserts when its bounding-box model finds no head at all.
                raise InferenceError(
                    f"series {volume.series_instance_uid}: deepbet found no brain: {exc}"
                ) from exc
        if not np.allclose(mask_image.affine, image.affine, atol=1e-4):
            raise InferenceError(
                f"series {volume.series_instance_uid}: deepbet mask is not on the input grid"
            )
        mask_xyz = np.asanyarray(mask_image.dataobj)
        label_map = mask_from_nifti_grid(mask_xyz, volume).astype(np.uint8) * np.uint8(BRAIN_LABEL)
        return label_map
