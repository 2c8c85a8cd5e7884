"""ct-lung training: deterministic phantoms with patient-correct sides, and a tiny end-to-end training run.

Small phantoms (96 x 96 pixels of ~4 mm) and a tiny network keep this under a few seconds; the real
training run and its evaluation are in dicom_ai_node/training (see docs/models.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_ai_node.infer.base import SegmentationModel
from dicom_ai_node.infer.grid import label_map_to_model_grid, to_model_grid
from dicom_ai_node.infer.manifest import load_manifest, verify_weights
from dicom_ai_node.infer.registry import build_model
from dicom_ai_node.infer.volume import Volume
from dicom_ai_node.training.phantoms import LEFT, RIGHT, make_phantom
from dicom_ai_node.training.train_ct_lung import INPUT_SPEC, train_ct_lung

TINY_NETWORK = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [4, 8],
    "strides": [2],
    "num_res_units": 0,
    "norm": "batch",
}


def _mean_lps_x(volume: Volume, mask: np.ndarray) -> float:
    frames, rows, cols = np.nonzero(mask)
    index = np.stack([cols, rows, frames, np.ones_like(cols)]).astype(float)
    return float((volume.affine_lps @ index)[0].mean())


def test_phantom_is_deterministic_for_a_seed() -> None:
    first = make_phantom(3, matrix=96, slice_mm=5.0)
    again = make_phantom(3, matrix=96, slice_mm=5.0)
    other = make_phantom(4, matrix=96, slice_mm=5.0)
    assert np.array_equal(first.volume.array, again.volume.array)
    assert np.array_equal(first.labels, again.labels)
    assert np.array_equal(first.volume.affine_lps, again.volume.affine_lps)
    assert not np.array_equal(first.labels, other.labels) or first.volume.shape != other.volume.shape


@pytest.mark.parametrize("flips", [(False, False, False), (True, False, False), (True, True, True)])
def test_phantom_labels_follow_patient_sides_whatever_the_storage_order(
    flips: tuple[bool, bool, bool],
) -> None:
    phantom = make_phantom(5, matrix=96, slice_mm=5.0, flips=flips)
    volume, labels = phantom.volume, phantom.labels
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, RIGHT, LEFT}
    # LPS: +x is the patient's left, so the right lung lies at smaller x than the left lung.
    assert _mean_lps_x(volume, labels == RIGHT) < 0 < _mean_lps_x(volume, labels == LEFT)
    # Lungs are air-dense: mean HU well below soft tissue.
    assert float(volume.array[labels > 0].mean()) < -500
    # On the model grid (RAS: axis 0 grows towards the patient's right) the right lung has larger x.
    _, grid = to_model_grid(volume, INPUT_SPEC)
    on_grid = label_map_to_model_grid(labels, grid)
    x_right = np.nonzero(on_grid == RIGHT)[0].mean()
    x_left = np.nonzero(on_grid == LEFT)[0].mean()
    assert x_right > x_left


def _tiny_run(out: Path) -> Path:
    return train_ct_lung(
        out,
        seed=1,
        iterations=2,
        phantoms=2,
        real_cases=(),
        network=TINY_NETWORK,
        crop=(32, 32, 16),
        phantom_matrix=96,
        log=lambda _: None,
    )


def test_tiny_training_run_writes_a_verified_loadable_model(tmp_path: Path) -> None:
    out = _tiny_run(tmp_path / "ct-lung")
    manifest = load_manifest(out)
    assert manifest.name == "ct-lung" and manifest.format == "monai-unet"
    assert [s.value for s in manifest.outputs.segments] == [RIGHT, LEFT]
    assert verify_weights(manifest) == []
    model = build_model(manifest, "cpu")
    phantom = make_phantom(11, matrix=96, slice_mm=5.0)
    assert isinstance(model, SegmentationModel)
    labels = model.segment(phantom.volume)
    assert labels.shape == phantom.volume.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, RIGHT, LEFT}

    # Seeded: the same command gives the same weights, bit for bit.
    again = load_manifest(_tiny_run(tmp_path / "again"))
    assert again.weights[0].sha256 == manifest.weights[0].sha256

    # Tampered weights are refused by their sha256.
    (out / "model.pt").write_bytes((out / "model.pt").read_bytes() + b"\0")
    assert verify_weights(load_manifest(out))
