"""Source grid <-> model grid: reorientation, resampling and the way back to the exact source grid."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from dicom_ai_node.infer.grid import (
    label_map_to_model_grid,
    labels_to_source_grid,
    prepare_intensity,
    resize,
    to_model_grid,
)
from dicom_ai_node.infer.manifest import InputSpec, Intensity
from dicom_ai_node.infer.volume import Volume


def _volume() -> tuple[Volume, np.ndarray]:
    """Frames run feet-wards, columns towards the patient's right (both flipped against LPS)."""
    frames, rows, cols = 40, 120, 100
    affine = np.eye(4)
    affine[:3, 0] = [-0.8, 0, 0]
    affine[:3, 1] = [0, 0.7, 0]
    affine[:3, 2] = [0, 0, -2.5]
    affine[:3, 3] = [40, -50, 100]
    z, y, x = np.mgrid[:frames, :rows, :cols]
    labels = np.zeros((frames, rows, cols), np.uint8)
    labels[((x - 30) ** 2 / 400 + (y - 60) ** 2 / 900 + (z - 20) ** 2 / 100) < 1] = 1
    labels[((x - 70) ** 2 / 400 + (y - 60) ** 2 / 900 + (z - 20) ** 2 / 100) < 1] = 2
    header = pydicom.Dataset()
    header.SeriesInstanceUID = "1.2.3"
    array = np.where(labels > 0, -800, 40).astype(np.float32)
    return Volume(array, [header], [], (2.5, 0.7, 0.8), affine, "CT"), labels


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "native"])
def test_round_trip_lands_on_the_exact_source_grid(orientation: str) -> None:
    volume, labels = _volume()
    prepared, grid = to_model_grid(volume, InputSpec(orientation=orientation, spacing_mm=(2.0, 2.0, 2.0)))
    assert prepared.shape == (1, *grid.model_shape)
    assert grid.model_spacing == pytest.approx((2.0, 2.0, 2.0), rel=0.05)
    on_model = label_map_to_model_grid(labels, grid)
    probabilities = np.stack([(on_model == k).astype(np.float32) for k in range(3)])
    back = labels_to_source_grid(probabilities, grid, [1, 2])
    assert back.shape == labels.shape and back.dtype == np.uint8
    for value in (1, 2):
        a, b = back == value, labels == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.96


def test_ras_axes_point_right_anterior_superior() -> None:
    volume, labels = _volume()
    _, grid = to_model_grid(volume, InputSpec(orientation="RAS", spacing_mm=None))
    on_model = label_map_to_model_grid(labels, grid)
    frames = labels.shape[0]
    # Columns already run towards the patient's right (RAS axis 0); rows run posterior, so RAS axis 1
    # (anterior) flips them; frames run feet-wards, so RAS axis 2 (superior) flips them too.
    for k in (0, 17, frames - 1):
        assert np.array_equal(on_model[:, :, k], labels[frames - 1 - k].T[:, ::-1])
    # Label 2 (column 70, LPS x = -16 mm) is on the patient's right of label 1 (x = +16 mm).
    assert np.nonzero(on_model == 2)[0].mean() > np.nonzero(on_model == 1)[0].mean()


def test_resize_is_separable_trilinear() -> None:
    rng = np.random.default_rng(0)
    array = rng.random((2, 40, 33, 70), dtype=np.float32)
    import torch
    import torch.nn.functional as F

    # Shrinking in-plane is antialiased in the node (unlike plain trilinear); compare growing sizes.
    grow = resize(array, (60, 50, 90))
    expected_grow = F.interpolate(
        torch.from_numpy(array)[None], size=(60, 50, 90), mode="trilinear", align_corners=False
    )
    assert np.allclose(grow, expected_grow[0].numpy(), atol=1e-5)
    assert resize(array, (50, 21, 35)).shape == (2, 50, 21, 35)


def test_intensity_window_and_normalisation() -> None:
    array = np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0], dtype=np.float32)
    spec = InputSpec(intensity=Intensity(window=(-1000, 400), normalise="minmax"))
    assert prepare_intensity(array, spec) == pytest.approx([0, 0, 0.5, 1, 1])
    z = prepare_intensity(array, InputSpec(intensity=Intensity(window=(-1000, 400), normalise="zscore")))
    assert float(z.mean()) == pytest.approx(0, abs=1e-6) and float(z.std()) == pytest.approx(1, abs=1e-5)
