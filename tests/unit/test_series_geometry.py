"""Series whose Type 2/3 geometry attributes are empty or absent (issue 12).

Derived and reformatted series often carry no SliceThickness or SpacingBetweenSlices: the slice step is
derived from ImagePositionPatient along the normal of ImageOrientationPatient, and the SEG records it as
its Pixel Measures slice thickness. A series whose geometry cannot be derived (no position, orientation
or pixel spacing; one slice and no thickness) fails in load_series, before any pixel is decoded, with
an error naming the attribute and the series.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.domain.results import (
    SCT_ANATOMICAL_STRUCTURE,
    SCT_LEFT_LUNG,
    ModelIdentity,
    OutputIdentity,
    RuleIdentity,
    SegmentSpec,
)
from dicom_ai_node.encode import encode_seg, encode_sr, measure, result_uids, write_dataset
from dicom_ai_node.errors import EncodeError, InvalidDicomError, PermanentError, SeriesGeometryError
from dicom_ai_node.infer.volume import Volume, load_series, voxel_volume_mm3

MODEL = ModelIdentity(name="lungseg", version="1.2.0")
RULE = RuleIdentity(rule_id="chest-ct", rule_version=3)
LEFT = SegmentSpec(1, "Left lung", SCT_ANATOMICAL_STRUCTURE, SCT_LEFT_LUNG, (128, 174, 128))
# Not the synthetic writer's default (2.5), so a test cannot pass on a left-over declared value.
SPACING_MM = 1.25

Edit = Callable[[Dataset], None]


def _rewrite(paths: list[Path], edit: Edit, only: int | None = None) -> None:
    for index, path in enumerate(paths):
        if only is None or index == only:
            ds = pydicom.dcmread(path)
            edit(ds)
            ds.save_as(path)


def _delete(*keywords: str) -> Edit:
    def edit(ds: Dataset) -> None:
        for keyword in keywords:
            delattr(ds, keyword)

    return edit


def _blank(*keywords: str) -> Edit:
    """Present with an empty value (Type 2 style)."""

    def edit(ds: Dataset) -> None:
        for keyword in keywords:
            setattr(ds, keyword, None)

    return edit


def _encode(volume: Volume, tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    label_map = np.zeros(volume.shape, dtype=np.uint8)
    label_map[1:4, 20:40, 10:30] = LEFT.label_value
    uids = result_uids(volume.series_instance_uid, MODEL, RULE)
    seg = encode_seg(
        source_datasets=volume.datasets,
        label_map=label_map,
        segments=[LEFT],
        model=MODEL,
        rule=RULE,
        identity=OutputIdentity(),
        uids=uids,
    )
    assert seg is not None
    sr = encode_sr(
        source_datasets=volume.datasets,
        seg=seg,
        measurements=measure(label_map, [LEFT], voxel_volume_mm3(volume)),
        segments=[LEFT],
        model=MODEL,
        rule=RULE,
        identity=OutputIdentity(),
        uids=uids,
    )
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    write_dataset(seg, seg_path)
    write_dataset(sr, sr_path)
    return seg_path, sr_path, label_map


def _position_derived_spacing(paths: list[Path]) -> float:
    """Independent of the node's code: mean step of the positions along the normal."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    iop = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    along = sorted(float(np.array([float(v) for v in ds.ImagePositionPatient]) @ normal) for ds in headers)
    return (along[-1] - along[0]) / (len(along) - 1)


@pytest.mark.parametrize(
    "edit",
    [
        _delete("SliceThickness"),
        _blank("SliceThickness"),
        _delete("SliceThickness", "SliceLocation"),
        _blank("SliceThickness", "SpacingBetweenSlices"),
    ],
    ids=[
        "thickness-absent",
        "thickness-empty",
        "thickness-and-location-absent",
        "thickness-and-spacing-empty",
    ],
)
def test_a_series_without_slice_thickness_gives_a_seg_with_the_position_derived_thickness(
    tmp_path: Path, edit: Edit
) -> None:
    paths = write_ct_series(tmp_path / "ct", n_slices=6, slice_thickness=SPACING_MM)
    _rewrite(paths, edit)
    derived = _position_derived_spacing(paths)
    assert derived == pytest.approx(SPACING_MM, abs=1e-3)

    volume = load_series(paths)
    assert volume.spacing[0] == pytest.approx(derived)
    assert all(not ds.get("SliceThickness") for ds in volume.datasets)  # the node's headers are untouched

    seg_path, sr_path, label_map = _encode(volume, tmp_path)
    seg = hd.seg.segread(seg_path)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(derived, abs=1e-6)
    assert [float(v) for v in measures.PixelSpacing] == [0.8, 0.8]
    pixels = seg.get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in volume.datasets],
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), label_map == LEFT.label_value)

    # The SR's volume uses the same derived spacing.
    report = hd.sr.srread(sr_path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    [group] = report.get_volumetric_roi_measurement_groups()
    [volume_item] = group.get_measurements()
    expected_cm3 = int(label_map.astype(bool).sum()) * 0.8 * 0.8 * derived / 1000.0
    assert volume_item.value == pytest.approx(expected_cm3, rel=1e-6)


def test_a_single_slice_takes_spacing_between_slices_when_thickness_is_missing(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "ct", n_slices=1, rows=64, cols=64)

    def edit(ds: Dataset) -> None:
        del ds.SliceThickness
        ds.SpacingBetweenSlices = 3.0

    _rewrite(paths, edit)
    volume = load_series(paths)
    assert volume.spacing[0] == 3.0
    label_map = np.zeros(volume.shape, dtype=np.uint8)
    label_map[0, 10:20, 10:20] = 1
    seg = encode_seg(
        source_datasets=volume.datasets,
        label_map=label_map,
        segments=[LEFT],
        model=MODEL,
        rule=RULE,
        identity=OutputIdentity(),
        uids=result_uids(volume.series_instance_uid, MODEL, RULE),
    )
    assert seg is not None
    assert float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == 3.0


def test_a_single_slice_without_any_thickness_is_a_geometry_error(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "ct", n_slices=1)
    _rewrite(paths, _blank("SliceThickness"))
    series_uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    with pytest.raises(SeriesGeometryError) as caught:
        load_series(paths)
    assert caught.value.attribute == "SliceThickness"
    assert series_uid in str(caught.value) and "single slice" in str(caught.value)

    # The encoder refuses the same input on its own (callers other than the worker).
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    with pytest.raises(EncodeError, match="SliceThickness is empty or absent"):
        encode_seg(
            source_datasets=[header],
            label_map=np.ones((1, 64, 64), dtype=np.uint8),
            segments=[LEFT],
            model=MODEL,
            rule=RULE,
            identity=OutputIdentity(),
            uids=result_uids(str(header.SeriesInstanceUID), MODEL, RULE),
        )


@pytest.mark.parametrize("state", ["absent", "empty"])
@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_an_underivable_geometry_fails_before_any_pixel_is_decoded(
    tmp_path: Path, keyword: str, state: str
) -> None:
    paths = write_ct_series(tmp_path / "ct", n_slices=4)
    _rewrite(paths, _delete(keyword) if state == "absent" else _blank(keyword), only=2)

    def break_pixels(ds: Dataset) -> None:
        ds.PixelData = b"\x00\x01"  # would fail to decode, were pixels decoded first

    _rewrite(paths, break_pixels)
    bad = pydicom.dcmread(paths[2], stop_before_pixels=True)
    with pytest.raises(SeriesGeometryError) as caught:
        load_series(paths)
    error = caught.value
    assert isinstance(error, InvalidDicomError) and isinstance(error, PermanentError)
    assert error.attribute == keyword
    assert error.series_instance_uid == str(bad.SeriesInstanceUID)
    message = str(error)
    assert message.startswith(f"series {bad.SeriesInstanceUID}: {keyword} is {state} in instance ")
    assert str(bad.SOPInstanceUID) in message and "cannot be derived" in message
    assert "Synthetic" not in message  # no patient name


def test_a_geometry_error_crosses_processes_intact() -> None:
    error = SeriesGeometryError("1.2.3", "ImagePositionPatient", "ImagePositionPatient is absent")
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, SeriesGeometryError)
    assert (copy.series_instance_uid, copy.attribute, str(copy)) == (
        "1.2.3",
        "ImagePositionPatient",
        "series 1.2.3: ImagePositionPatient is absent",
    )
