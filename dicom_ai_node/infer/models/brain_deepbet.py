"""`mr-brain`: brain extraction on T1-weighted MR with deepbet's pretrained CNN.

deepbet (https://github.com/wwu-mmll/deepbet, MIT licence, Fisch et al. 2024) ships two TorchScript
3-D U-Nets inside its wheel (`deepbet.utils.DATA_PATH/models`: a 128^3 bounding-box model and a 256^3
mask model); nothing is downloaded. Its `BrainExtraction.run` takes a NIfTI image, works in the closest
canonical (RAS) orientation and returns the mask reoriented back onto the input image's own voxel grid,
so the mask maps back to the DICOM grid by a transpose only (see volume.to_nifti_ras).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import threading
import warnings
from pathlib import Path

import numpy as np

from dicom_ai_node.domain.results import (
    SCT_ANATOMICAL_STRUCTURE,
    SCT_BRAIN,
    ModelIdentity,
    SegmentSpec,
)
from dicom_ai_node.errors import InferenceError
from dicom_ai_node.infer.volume import Volume, mask_from_nifti_grid, to_nifti_ras

MODEL_NAME = "mr-brain"
BRAIN_LABEL = 1


def _deepbet_version() -> str:
    try:
        return importlib.metadata.version("deepbet")
    except importlib.metadata.PackageNotFoundError:
        return "1.0.2"


class DeepbetBrainModel:
    """Warm deepbet model; `segment` is serialised because BrainExtraction keeps per-call state."""

    accepts_modalities: tuple[str, ...] = ("MR",)

    def __init__(self, device: str = "cpu") -> None:
        # deepbet imports torch: keep it out of module import so the registry stays cheap to build.
        from deepbet.bet import BrainExtraction
        from deepbet.utils import DATA_PATH

        model_path = Path(DATA_PATH) / "models" / "model.pt"
        bbox_model_path = Path(DATA_PATH) / "models" / "bbox_model.pt"
        for path in (model_path, bbox_model_path):
            if not path.is_file():
                raise InferenceError(f"deepbet weights missing at {path}: reinstall the deepbet wheel")
        self.weights_sha256 = hashlib.sha256(model_path.read_bytes()).hexdigest()
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
            name=MODEL_NAME,
            version=f"deepbet-{_deepbet_version()}",
            description=f"deepbet brain extraction CNN (MIT), weights sha256 {self.weights_sha256[:16]}",
        )
        self.segments = [
            SegmentSpec(
                label_value=BRAIN_LABEL,
                label="Brain",
                category=SCT_ANATOMICAL_STRUCTURE,
                property_type=SCT_BRAIN,
                rgb=(255, 160, 80),
            )
        ]

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
