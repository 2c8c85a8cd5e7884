"""The series loader and encoders on odd series, without a node (issue 12; the whole path is in
tests/integration/test_odd_series.py): what is refused names where, and what is normal is not refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from dicom_ai_node.devtools.synthetic import write_cr_image, write_ct_series
from dicom_ai_node.encode._common import with_type2_identity
from dicom_ai_node.errors import InvalidDicomError
from dicom_ai_node.infer.volume import load_series


def _set_position_z(path: Path, z: float) -> None:
    ds = dcmread(path)
    ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1]), z]
    ds.save_as(path)


@pytest.mark.parametrize(("step", "decimals"), [(0.625, 2), (2.5, 1), (5.0, 3)])
def test_positions_rounded_as_scanners_write_them_still_load(
    tmp_path: Path, step: float, decimals: int
) -> None:
    paths = write_ct_series(tmp_path / "ct", n_slices=12, rows=16, cols=16, slice_thickness=step)
    jitter = np.random.default_rng(3).uniform(-0.02, 0.02, len(paths))
    for k, path in enumerate(paths):
        _set_position_z(path, round(k * step + 100.0 + float(jitter[k]), decimals))
    assert load_series(paths).shape == (12, 16, 16)


def test_several_gaps_are_counted(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "ct", n_slices=10, rows=16, cols=16, slice_thickness=2.0)
    for k in (2, 6, 7):
        paths[k].unlink()
    with pytest.raises(
        InvalidDicomError, match=r"3 slices missing in 2 gaps, the first between z=-7\.00 and z=-3\.00 mm"
    ):
        load_series([p for p in paths if p.exists()])


def _cr_copy(source: Path, target: Path, instance_number: int, *, brighter: bool) -> Path:
    ds = dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = instance_number
    if brighter:
        ds.PixelData = (np.frombuffer(ds.PixelData, dtype="<u2") // 2).astype("<u2").tobytes()
    ds.save_as(target)
    return target


def test_radiographs_are_not_slices(tmp_path: Path) -> None:
    """Projection images get nominal positions from InstanceNumber: a gap in the numbering is no missing
    slice; two different images with one number are refused as two images, named as radiographs."""
    first = write_cr_image(tmp_path / "cr", brightness=0.8, rows=32, cols=32)
    third = _cr_copy(first, tmp_path / "third.dcm", 3, brighter=True)
    fifth = _cr_copy(first, tmp_path / "fifth.dcm", 7, brighter=True)
    assert load_series([first, third, fifth]).shape == (3, 32, 32)
    other = _cr_copy(first, tmp_path / "other.dcm", 1, brighter=True)
    with pytest.raises(InvalidDicomError, match=r"at InstanceNumber 1 \(radiographs without a position\)"):
        load_series([first, other])


def test_a_deflated_series_decodes_to_the_same_volume(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "ct", n_slices=3, rows=16, cols=16)
    reference = load_series(paths).array
    for path in paths:
        ds = dcmread(path)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    np.testing.assert_array_equal(load_series(paths).array, reference)


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        (["", "ISO 2022 IR 87"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
        ("ISO_IR 6", None),
        ("", None),
    ],
)
def test_character_sets_highdicom_refuses_are_respelled_with_the_same_meaning(
    written: str | list[str], expected: list[str] | None
) -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = written
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        setattr(ds, keyword, "")
    for keyword in ("AccessionNumber", "StudyID", "StudyDate", "StudyTime"):
        setattr(ds, keyword, "")
    respelled = with_type2_identity(ds)
    assert respelled is not ds and ds.SpecificCharacterSet == written  # the caller's copy is untouched
    assert respelled.get("SpecificCharacterSet") == expected


def test_a_character_set_highdicom_takes_is_left_as_it_is() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = ["ISO 2022 IR 13", "ISO 2022 IR 87"]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        setattr(ds, keyword, "")
    for keyword in ("AccessionNumber", "StudyID", "StudyDate", "StudyTime"):
        setattr(ds, keyword, "")
    assert with_type2_identity(ds) is ds
