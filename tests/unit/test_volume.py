"""Series -> volume: ordering, rescale, MONOCHROME1, geometry, and refusing what is not one grid."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import UID, JPEG2000Lossless, JPEGLSLossless, RLELossless

from dicom_ai_node.devtools.synthetic import ct_phantom_hu, write_ct_series, write_mr_series
from dicom_ai_node.errors import InvalidDicomError, PermanentError
from dicom_ai_node.infer.volume import load_series, mask_from_nifti_grid, to_nifti_ras, voxel_volume_mm3


def _shuffled(paths: list[Path], tmp_path: Path) -> list[Path]:
    """Copy files under random names, so neither file name nor list order says the slice order."""
    out = tmp_path / "shuffled"
    out.mkdir()
    copies = []
    for i, p in enumerate(paths):
        dest = out / f"{random.Random(i).getrandbits(64):016x}.dcm"
        shutil.copy(p, dest)
        copies.append(dest)
    random.Random(7).shuffle(copies)
    return copies


def test_sorted_along_the_normal_whatever_the_file_order(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "ct", n_slices=10)
    volume = load_series(_shuffled(paths, tmp_path))
    expected = [str(dcmread(p).SOPInstanceUID) for p in paths]  # written in slice order
    assert [str(ds.SOPInstanceUID) for ds in volume.datasets] == expected
    assert volume.shape == (10, 64, 64)
    assert "PixelData" not in volume.datasets[0]  # headers only


@pytest.mark.parametrize(("slope", "intercept"), [(2.0, -2048.0), (-1.0, 1000.0)])
def test_rescale_gives_hounsfield_units(tmp_path: Path, slope: float, intercept: float) -> None:
    paths = write_ct_series(tmp_path / "ct", n_slices=6, rescale_slope=slope, rescale_intercept=intercept)
    volume = load_series(paths)
    np.testing.assert_allclose(volume.array, ct_phantom_hu(6, 64, 64), atol=1.0)
    assert volume.modality == "CT"


def test_geometry_affine_and_spacing(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "ct", n_slices=5, pixel_spacing=(0.7, 0.9), slice_thickness=2.5)
    volume = load_series(paths)
    first, second = (np.array([float(v) for v in dcmread(p).ImagePositionPatient]) for p in paths[:2])
    np.testing.assert_allclose(volume.affine_lps @ [0, 0, 0, 1], [*first, 1])
    np.testing.assert_allclose(volume.affine_lps @ [0, 0, 1, 1], [*second, 1])
    # Column index i moves along the row cosines by the column spacing (PixelSpacing[1]).
    np.testing.assert_allclose((volume.affine_lps @ [1, 0, 0, 1])[:3] - first, [0.9, 0, 0])
    np.testing.assert_allclose((volume.affine_lps @ [0, 1, 0, 1])[:3] - first, [0, 0.7, 0])
    dz, dy, dx = volume.spacing
    assert (dy, dx) == (0.7, 0.9)
    assert dz == pytest.approx(float(np.linalg.norm(second - first)))
    assert voxel_volume_mm3(volume) == pytest.approx(dz * 0.7 * 0.9)


def test_oblique_orientation(tmp_path: Path) -> None:
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    iop = (c, s, 0.0, -s, c, 0.0)
    paths = write_ct_series(tmp_path / "ct", n_slices=4, image_orientation_patient=iop)
    volume = load_series(_shuffled(paths, tmp_path))
    assert [str(ds.SOPInstanceUID) for ds in volume.datasets] == [
        str(dcmread(p).SOPInstanceUID) for p in paths
    ]
    np.testing.assert_allclose(volume.affine_lps[:3, 0] / np.linalg.norm(volume.affine_lps[:3, 0]), iop[:3])


def test_double_oblique_affine_maps_every_frame_to_its_position(tmp_path: Path) -> None:
    """Rotated about two axes, so the slice normal is along no patient axis and sorting needs the normal."""
    rotation = _rotation_x(35) @ _rotation_z(-25)
    iop = (*rotation[:, 0], *rotation[:, 1])
    paths = write_ct_series(tmp_path / "ct", n_slices=6, image_orientation_patient=iop, slice_thickness=3.0)
    volume = load_series(_shuffled(paths, tmp_path))
    for k, path in enumerate(volume.paths):
        ds = dcmread(path)
        assert ds.SOPInstanceUID == volume.datasets[k].SOPInstanceUID  # paths, headers, frames agree
        position = [float(v) for v in ds.ImagePositionPatient]
        np.testing.assert_allclose((volume.affine_lps @ [0, 0, k, 1])[:3], position, atol=1e-3)
    assert volume.spacing[0] == pytest.approx(3.0, abs=1e-3)
    assert voxel_volume_mm3(volume) == pytest.approx(3.0 * 0.8 * 0.8, rel=1e-4)


def _rotation_x(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rotation_z(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize("transfer_syntax", [JPEGLSLossless, JPEG2000Lossless, RLELossless])
def test_compressed_instances_decode_to_the_same_volume(tmp_path: Path, transfer_syntax: UID) -> None:
    paths = write_ct_series(tmp_path / "ct", n_slices=3)
    reference = load_series(paths).array
    for p in paths:
        ds = dcmread(p)
        ds.compress(transfer_syntax)
        ds.save_as(p)
    np.testing.assert_array_equal(load_series(paths).array, reference)


def test_multi_frame_instance_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = write_ct_series(tmp_path / "ct", n_slices=1)[0]
    ds = dcmread(path)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(path)
    with pytest.raises(InvalidDicomError, match="multi-frame"):
        load_series([path])


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    paths = write_mr_series(tmp_path / "mr", n_slices=4)
    reference = load_series(paths).array
    for p in paths:
        ds = dcmread(p)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(p)
    inverted = load_series(paths).array
    np.testing.assert_allclose(inverted, reference.max() - reference)


def test_duplicate_positions_are_dropped(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "ct", n_slices=4)
    dup = dcmread(paths[1])
    dup.SOPInstanceUID = dup.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3.999")
    dup.save_as(tmp_path / "dup.dcm")
    volume = load_series([*paths, tmp_path / "dup.dcm"])
    assert volume.shape[0] == 4


def test_nifti_round_trip_is_exact(tmp_path: Path) -> None:
    volume = load_series(write_mr_series(tmp_path / "mr", n_slices=5))
    image = to_nifti_ras(volume)
    assert image.shape == (64, 64, 5)
    # LPS -> RAS: x and y flip sign.
    np.testing.assert_allclose(image.affine[:2], -volume.affine_lps[:2])
    back = mask_from_nifti_grid(np.asarray(image.dataobj), volume)
    np.testing.assert_array_equal(back, volume.array)


@pytest.mark.parametrize("change", ["series", "rows", "orientation", "spacing"])
def test_mixed_series_is_refused(tmp_path: Path, change: str) -> None:
    paths = write_ct_series(tmp_path / "a", n_slices=3)
    odd = dcmread(paths[0])
    odd.SOPInstanceUID = "1.2.3.4.5"
    if change == "series":
        odd.SeriesInstanceUID = "1.2.3.4"
    elif change == "rows":
        other = dcmread(write_ct_series(tmp_path / "b", n_slices=1, rows=32, cols=64)[0])
        odd.Rows, odd.PixelData = other.Rows, other.PixelData
    elif change == "orientation":
        odd.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    else:
        odd.PixelSpacing = [0.5, 0.5]
    odd.save_as(tmp_path / "odd.dcm")
    with pytest.raises(InvalidDicomError) as info:
        load_series([*paths, tmp_path / "odd.dcm"])
    assert isinstance(info.value, PermanentError)  # a retry cannot fix the data: straight to dead letter


def test_unreadable_and_empty_inputs(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(InvalidDicomError):
        load_series([junk])
    with pytest.raises(InvalidDicomError):
        load_series([])
