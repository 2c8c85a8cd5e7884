"""Build, store and show the reference lung masks of the real chest CTs.

`python -m dicom_ai_node.training.references` rebuilds tests/data/references/<case>_lungs.nrrd and the
overlays docs/images/ct-lung-reference-<case>.png. The rule, applied identically to both cases:

1. Start from the classical baseline (ct-lung-classical): air-dense lung inside the body, trachea
   removed, left/right by patient coordinates, vessels filled per slice.
2. Add the tumour: pyradiomics ships an expert tumour label (`<case>_label.nrrd`) for each CT. A lung
   mask should hold the lung's lesions, but the classical threshold drops a solid tumour that touches the
   pleura (lung2: a 48 ml left lower lobe mass). Tumour voxels not already lung get the label of the lung
   they touch most (in a 3-voxel in-plane ring), so the mask is the whole lung, tumour included.

Everything else was checked slice by slice by eye and left as the classical result: at 5 mm slices the
main bronchi merge with the hila and stay in the lung masks (where they leave the trachea they are
excluded), and partial-volume voxels over the diaphragm domes count as lung where they are below
-320 HU. A CNN trained on these masks learns these conventions, so the Dice of ct-lung against them
measures agreement with this definition of "lung".
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from dicom_ai_node.infer.models.lung_classical import ClassicalLungModel
from dicom_ai_node.training.data import (
    REAL_CASES,
    REFERENCES_DIR,
    REPO_ROOT,
    load_real_ct,
    nrrd_path,
    save_reference,
)
from dicom_ai_node.training.overlays import render_montage

log = logging.getLogger(__name__)
DOCS_IMAGES = REPO_ROOT / "docs" / "images"


def tumour_mask(case: str) -> np.ndarray:
    """pyradiomics' tumour label of `case` as bool (frames, rows, cols)."""
    import nrrd

    label, _ = nrrd.read(str(nrrd_path(f"{case}_label.nrrd")))
    return np.ascontiguousarray(np.asarray(label).transpose(2, 1, 0) > 0)


def add_lesion(labels: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """`labels` with `lesion` voxels that are not lung given the label of the lung they touch most."""
    out = labels.copy()
    ring = ndi.binary_dilation(lesion, structure=np.ones((1, 7, 7), dtype=bool)) & ~lesion
    touching = np.bincount(labels[ring], minlength=3)[1:3]
    if touching.sum() == 0:
        log.warning("lesion touches no lung: left out of the reference")
        return out
    side = int(np.argmax(touching)) + 1
    out[lesion & (labels == 0)] = side
    return out


def build_reference(case: str) -> np.ndarray:
    """The reference label map of `case` (1 right lung, 2 left lung) by the rule in the module docstring."""
    volume = load_real_ct(case)
    classical = ClassicalLungModel().segment(volume)
    return add_lesion(classical, tumour_mask(case))


def main(references_dir: Path = REFERENCES_DIR, images_dir: Path = DOCS_IMAGES) -> None:
    for case in REAL_CASES:
        volume = load_real_ct(case)
        labels = build_reference(case)
        save_reference(case, labels, references_dir)
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        right, left = (float((labels == v).sum()) * voxel_ml for v in (1, 2))
        render_montage(
            volume,
            labels,
            images_dir / f"ct-lung-reference-{case}.png",
            f"ct-lung reference masks, pyradiomics {case} (right {right:.0f} ml, left {left:.0f} ml)",
        )
        print(f"{case}: right lung {right:.0f} ml, left lung {left:.0f} ml")


if __name__ == "__main__":
    main()
