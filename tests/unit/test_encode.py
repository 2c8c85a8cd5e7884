"""SEG + TID 1500 SR encoding on synthetic CT and MR series: validated by dciodvfy, round-tripped
through highdicom under strict pydicom settings, and compared voxel for voxel with the input."""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_ai_node.devtools.synthetic import FAKE_PATIENT_ID, write_ct_series, write_mr_series
from dicom_ai_node.domain.results import (
    SCT_ANATOMICAL_STRUCTURE,
    SCT_BRAIN,
    SCT_LEFT_LUNG,
    SCT_LUNG,
    SCT_RIGHT_LUNG,
    CodedConcept,
    ModelIdentity,
    OutputIdentity,
    RuleIdentity,
    SegmentSpec,
)
from dicom_ai_node.encode import (
    display_cielab,
    encode_seg,
    encode_sr,
    measure,
    result_uids,
    segment_numbers,
    segment_tracking_uid,
    write_dataset,
)
from dicom_ai_node.errors import EncodeError, InferenceError
from tests.support.tools import require_executable

MODEL = ModelIdentity(name="lungseg", version="1.2.0")
RULE = RuleIdentity(rule_id="chest-ct", rule_version=7)
IDENTITY = OutputIdentity(institution_name="Test Institution")

LEFT = SegmentSpec(1, "Left lung", SCT_ANATOMICAL_STRUCTURE, SCT_LEFT_LUNG, (128, 174, 128))
RIGHT = SegmentSpec(2, "Right lung", SCT_ANATOMICAL_STRUCTURE, SCT_RIGHT_LUNG, (241, 214, 145))
BRAIN = SegmentSpec(
    3,
    "Brain",
    SCT_ANATOMICAL_STRUCTURE,
    SCT_BRAIN,
    (250, 250, 225),
    anatomic_region=CodedConcept("69536005", "SCT", "Head"),
)
WHOLE_LUNG = SegmentSpec(4, "Lung", SCT_ANATOMICAL_STRUCTURE, SCT_LUNG, (0, 151, 206))


def voxel_volume_mm3(source_datasets: Sequence[Dataset]) -> float:
    """The expected voxel volume of the synthetic series (the node takes it from the volume loader). Voxel volume of a single-frame series in the given (slice) order, in mm3.

    In-plane from PixelSpacing; through-plane from the median distance between consecutive
    ImagePositionPatient along the slice normal (SliceThickness can differ from the spacing when
    slices overlap or have gaps), or SliceThickness for a single slice.
    """
    if not source_datasets:
        raise ValueError("no source datasets")
    first = source_datasets[0]
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    if len(source_datasets) == 1:
        return row_spacing * column_spacing * float(first.SliceThickness)
    iop = np.asarray([float(v) for v in first.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    positions = np.asarray(
        [[float(v) for v in ds.ImagePositionPatient] for ds in source_datasets], dtype=float
    )
    steps = np.abs(np.diff(positions @ normal))
    slice_spacing = float(np.median(steps))
    if slice_spacing <= 0:
        raise ValueError("source slices share one position; cannot derive a slice spacing")
    return row_spacing * column_spacing * slice_spacing


@pytest.fixture(autouse=True)
def strict_pydicom() -> Iterator[None]:
    """Encode and decode with pydicom raising on any invalid value (as highdicom's own tests do)."""
    settings = config.settings
    saved = (settings.reading_validation_mode, settings.writing_validation_mode)
    settings.reading_validation_mode = config.RAISE
    settings.writing_validation_mode = config.RAISE
    yield
    settings.reading_validation_mode, settings.writing_validation_mode = saved


@dataclass(frozen=True)
class Series:
    headers: list[Dataset]  # read with stop_before_pixels: the encoders must not need pixel data

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.headers), int(self.headers[0].Rows), int(self.headers[0].Columns))


def _read_headers(paths: Sequence[Path]) -> Series:
    return Series([pydicom.dcmread(p, stop_before_pixels=True) for p in paths])


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Series:
    return _read_headers(write_ct_series(tmp_path_factory.mktemp("ct")))


@pytest.fixture(scope="module")
def mr(tmp_path_factory: pytest.TempPathFactory) -> Series:
    return _read_headers(write_mr_series(tmp_path_factory.mktemp("mr")))


def two_segment_map(shape: tuple[int, int, int], first: int, second: int) -> np.ndarray:
    """Label `first` on slices 2..8 (slices 0,1,9,10,11 empty), label `second` on slices 4..5 only."""
    label_map = np.zeros(shape, dtype=np.uint8)
    label_map[2:9, 20:44, 8:28] = first
    label_map[4:6, 18:40, 36:58] = second
    label_map[5, 30, 30] = first  # a lone voxel next to the other segment
    return label_map


def run_dciodvfy(path: Path) -> list[str]:
    """dciodvfy's error lines (warnings are printed, not failed on)."""
    dciodvfy = require_executable("dciodvfy", "apt-get install dicom3tools")
    proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    # It names the IOD it checked against; an "Abort" means it could not read the file at all.
    assert not any(line.startswith("Abort") for line in lines), lines
    assert any(line in ("Segmentation", "ComprehensiveSR") for line in lines), lines
    for line in lines:
        if line.startswith("Warning"):
            print(f"dciodvfy {path.name}: {line}")
    return [line for line in lines if line.startswith("Error")]


def expected_segment_map(label_map: np.ndarray, numbered: list[tuple[int, SegmentSpec]]) -> np.ndarray:
    expected = np.zeros(label_map.shape, dtype=np.uint8)
    for number, spec in numbered:
        expected[label_map == spec.label_value] = number
    return expected


def assert_seg_round_trip(
    seg_path: Path, series: Series, label_map: np.ndarray, numbered: list[tuple[int, SegmentSpec]]
) -> None:
    seg = hd.seg.segread(seg_path)
    assert seg.get_segment_numbers() == [number for number, _ in numbered]

    # On the source grid, per source instance.
    source_uids = [str(ds.SOPInstanceUID) for ds in series.headers]
    pixels = seg.get_pixels_by_source_instance(
        source_uids,
        segment_numbers=[number for number, _ in numbered],
        assert_missing_frames_are_empty=True,
    )
    assert pixels.shape == (*series.shape, len(numbered))
    for index, (_, spec) in enumerate(numbered):
        np.testing.assert_array_equal(pixels[..., index].astype(bool), label_map == spec.label_value)

    # As a volume in patient space: each volume slice must land on the source slice at its position.
    volume = seg.get_volume(combine_segments=True)
    source_positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in series.headers])
    expected = expected_segment_map(label_map, numbered)
    matched: set[int] = set()
    for k in range(volume.shape[0]):
        position = volume.affine[:3, :3] @ np.array([k, 0, 0]) + volume.affine[:3, 3]
        hits = np.flatnonzero(np.all(np.isclose(source_positions, position, atol=1e-3), axis=1))
        assert len(hits) == 1, f"volume slice {k} at {position} matches no source slice"
        np.testing.assert_array_equal(volume.array[k], expected[hits[0]])
        matched.add(int(hits[0]))
    for index in set(range(series.shape[0])) - matched:
        assert not expected[index].any(), f"non-empty source slice {index} missing from the SEG volume"


def encode_and_write(
    tmp_path: Path,
    series: Series,
    label_map: np.ndarray,
    segments: list[SegmentSpec],
    *,
    omit_empty_frames: bool,
) -> tuple[Dataset | None, Dataset, Path | None, Path]:
    uids = result_uids(series.headers[0].SeriesInstanceUID, MODEL, RULE)
    seg = encode_seg(
        label_map=label_map,
        segments=segments,
        omit_empty_frames=omit_empty_frames,
        source_datasets=series.headers,
        model=MODEL,
        rule=RULE,
        identity=IDENTITY,
        uids=uids,
    )
    measurements = measure(label_map, segments, voxel_volume_mm3(series.headers))
    sr = encode_sr(
        seg=seg,
        measurements=measurements,
        segments=segments,
        source_datasets=series.headers,
        model=MODEL,
        rule=RULE,
        identity=IDENTITY,
        uids=uids,
    )
    seg_path = None
    if seg is not None:
        seg_path = tmp_path / "seg.dcm"
        write_dataset(seg, seg_path)
    sr_path = tmp_path / "sr.dcm"
    write_dataset(sr, sr_path)
    return seg, sr, seg_path, sr_path


@pytest.mark.parametrize("omit_empty_frames", [True, False], ids=["omit-empty", "all-frames"])
@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_seg_and_sr_are_valid_and_round_trip(
    tmp_path: Path, ct: Series, mr: Series, modality: str, omit_empty_frames: bool
) -> None:
    series = ct if modality == "CT" else mr
    if modality == "CT":
        # Two lungs found, the whole-lung label declared but empty -> 2 segments in the SEG.
        segments = [LEFT, RIGHT, WHOLE_LUNG]
        label_map = two_segment_map(series.shape, LEFT.label_value, RIGHT.label_value)
        expected_numbers = [(1, LEFT.label_value), (2, RIGHT.label_value)]
    else:
        # Label 2 declared but empty, label 3 present: the SEG renumbers label 3 to segment 2.
        segments = [LEFT, RIGHT, BRAIN]
        label_map = two_segment_map(series.shape, LEFT.label_value, BRAIN.label_value)
        expected_numbers = [(1, LEFT.label_value), (2, BRAIN.label_value)]
    numbered = segment_numbers(label_map, segments)
    assert [(n, s.label_value) for n, s in numbered] == expected_numbers

    seg, sr, seg_path, sr_path = encode_and_write(
        tmp_path, series, label_map, segments, omit_empty_frames=omit_empty_frames
    )
    assert seg is not None and seg_path is not None
    # Our own round-trip checks first: a missing validator must never hide them.
    assert_seg_header(pydicom.dcmread(seg_path), series, label_map, numbered, omit_empty_frames)
    assert_seg_round_trip(seg_path, series, label_map, numbered)
    assert_sr_content(sr_path, pydicom.dcmread(seg_path), series, label_map, segments, numbered)
    assert run_dciodvfy(seg_path) == []
    assert run_dciodvfy(sr_path) == []


def assert_seg_header(
    seg: Dataset,
    series: Series,
    label_map: np.ndarray,
    numbered: list[tuple[int, SegmentSpec]],
    omit_empty_frames: bool,
) -> None:
    source = series.headers[0]
    uids = result_uids(source.SeriesInstanceUID, MODEL, RULE)
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.SegmentationType == "BINARY"
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == (
        uids.seg_series_instance_uid,
        uids.seg_sop_instance_uid,
    )
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.PatientID == FAKE_PATIENT_ID
    assert [item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence] == [source.SeriesInstanceUID]
    referenced = {
        item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in series.headers}

    assert seg.SeriesNumber == IDENTITY.seg_series_number
    assert seg.SeriesDescription == f"{IDENTITY.seg_series_description_prefix} {MODEL.name}"
    assert seg.Manufacturer == IDENTITY.manufacturer
    assert seg.ManufacturerModelName == IDENTITY.manufacturer_model_name
    assert seg.SoftwareVersions == IDENTITY.software_versions
    assert seg.DeviceSerialNumber == IDENTITY.device_serial_number
    assert seg.InstitutionName == IDENTITY.institution_name
    assert seg.StationName == IDENTITY.station_name
    assert not seg.get("ContentCreatorName")  # no person to name, and never PHI
    assert seg.ContentDescription == f"rule {RULE.rule_id} v{RULE.rule_version}"

    assert len(seg.SegmentSequence) == len(numbered)
    for item, (number, spec) in zip(seg.SegmentSequence, numbered, strict=True):
        assert item.SegmentNumber == number
        assert item.SegmentLabel == spec.label
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == (spec.category.value, "SCT")
        assert (prop.CodeValue, prop.CodeMeaning) == (spec.property_type.value, spec.property_type.meaning)
        assert tuple(item.RecommendedDisplayCIELabValue) == display_cielab(spec.rgb)
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (MODEL.name, MODEL.version)
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == MODEL.family.value
        assert f"rule_id={RULE.rule_id}" in algorithm.AlgorithmParameters
        assert f"rule_version={RULE.rule_version}" in algorithm.AlgorithmParameters
        assert item.TrackingUID == segment_tracking_uid(uids, spec.label_value)
        if spec.anatomic_region is not None:
            assert item.AnatomicRegionSequence[0].CodeValue == spec.anatomic_region.value

    non_empty_frames = sum(
        int((label_map == spec.label_value).any(axis=(1, 2)).sum()) for _, spec in numbered
    )
    expected_frames = non_empty_frames if omit_empty_frames else len(numbered) * series.shape[0]
    assert seg.NumberOfFrames == expected_frames


def assert_sr_content(
    sr_path: Path,
    seg: Dataset,
    series: Series,
    label_map: np.ndarray,
    segments: list[SegmentSpec],
    numbered: list[tuple[int, SegmentSpec]],
) -> None:
    source = series.headers[0]
    uids = result_uids(source.SeriesInstanceUID, MODEL, RULE)
    sr = hd.sr.srread(sr_path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == (
        uids.sr_series_instance_uid,
        uids.sr_sop_instance_uid,
    )
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesNumber == IDENTITY.sr_series_number
    assert sr.SeriesDescription == f"{IDENTITY.sr_series_description_prefix} {MODEL.name}"
    assert sr.get_evidence() == [
        (source.StudyInstanceUID, seg.SeriesInstanceUID, seg.SOPInstanceUID, seg.SOPClassUID)
    ]
    # The segment reference names the source series instead of listing every source image.
    sr_bytes = sr_path.read_bytes()
    assert not any(str(ds.SOPInstanceUID).encode() in sr_bytes for ds in series.headers)

    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    voxel_mm3 = voxel_volume_mm3(series.headers)
    number_by_label = {spec.label_value: number for number, spec in numbered}
    found = report.get_volumetric_roi_measurement_groups()
    assert len(found) == len(numbered)
    for group, (_, spec) in zip(found, numbered, strict=True):
        assert group.tracking_uid == segment_tracking_uid(uids, spec.label_value)
        referenced = group.referenced_segment
        assert referenced is not None
        sop_ref = referenced[0].ReferencedSOPSequence[0]
        assert sop_ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert sop_ref.ReferencedSegmentNumber == number_by_label[spec.label_value]
        assert referenced[1].UID == source.SeriesInstanceUID  # Source Series for Segmentation
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.unit.value == "cm3"
        voxels = int((label_map == spec.label_value).sum())
        assert volume.value == pytest.approx(voxels * voxel_mm3 / 1000.0, rel=1e-9)
        assert _presence(group) == "Present"
        assert group.finding_type is not None
        assert group.finding_type.value == spec.property_type.value

    absent = [s for s in segments if s.label_value not in number_by_label]
    not_found = report.get_image_measurement_groups()
    assert [g.tracking_uid for g in not_found] == [segment_tracking_uid(uids, s.label_value) for s in absent]
    for absent_group in not_found:
        assert _presence(absent_group) == "Absent"
        assert absent_group.get_measurements() == []

    _assert_sr_identity(sr_bytes)


def _presence(
    group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations,
) -> str:
    """Value of the "Presence of property" (DCM 121052) qualitative evaluation of a group."""
    # highdicom types QualitativeEvaluation.value as a number; read the coded value directly.
    values = [
        q[0].ConceptCodeSequence[0].CodeMeaning
        for q in group.get_qualitative_evaluations()
        if q.name.value == "121052"
    ]
    assert len(values) == 1
    return str(values[0])


def _assert_sr_identity(sr_bytes: bytes) -> None:
    """Model name/version, rule id/version and the device observer are recorded in the SR."""
    for text in (
        MODEL.name,
        MODEL.version,
        f"rule_id={RULE.rule_id}",
        f"rule_version={RULE.rule_version}",
        IDENTITY.device_serial_number,
        IDENTITY.manufacturer,
    ):
        assert text.encode() in sr_bytes, text


def test_nothing_found_gives_no_seg_and_a_valid_not_found_sr(tmp_path: Path, ct: Series) -> None:
    segments = [LEFT, RIGHT]
    label_map = np.zeros(ct.shape, dtype=np.uint8)
    assert segment_numbers(label_map, segments) == []
    seg, sr, seg_path, sr_path = encode_and_write(tmp_path, ct, label_map, segments, omit_empty_frames=True)
    assert seg is None and seg_path is None
    assert run_dciodvfy(sr_path) == []

    parsed = hd.sr.srread(sr_path)
    report = parsed.content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert report.get_volumetric_roi_measurement_groups() == []
    groups = report.get_image_measurement_groups()
    uids = result_uids(ct.headers[0].SeriesInstanceUID, MODEL, RULE)
    assert [g.tracking_uid for g in groups] == [segment_tracking_uid(uids, s.label_value) for s in segments]
    assert [_presence(g) for g in groups] == ["Absent", "Absent"]
    # Without a SEG, the examined source instances are the evidence (and the patient/study source).
    assert {e[2] for e in parsed.get_evidence()} == {ds.SOPInstanceUID for ds in ct.headers}
    assert parsed.StudyInstanceUID == ct.headers[0].StudyInstanceUID
    _assert_sr_identity(sr_path.read_bytes())


def test_encoding_twice_gives_identical_identity(ct: Series) -> None:
    label_map = two_segment_map(ct.shape, 1, 2)
    uids = result_uids(ct.headers[0].SeriesInstanceUID, MODEL, RULE)
    first = encode_seg(
        source_datasets=ct.headers,
        label_map=label_map,
        segments=[LEFT, RIGHT],
        model=MODEL,
        rule=RULE,
        identity=IDENTITY,
        uids=uids,
    )
    again = encode_seg(
        source_datasets=ct.headers,
        label_map=label_map,
        segments=[LEFT, RIGHT],
        model=MODEL,
        rule=RULE,
        identity=IDENTITY,
        uids=uids,
    )
    assert first is not None and again is not None
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    assert [s.TrackingUID for s in first.SegmentSequence] == [s.TrackingUID for s in again.SegmentSequence]
    assert first.PixelData == again.PixelData


def test_source_without_type2_patient_attributes_still_encodes(tmp_path: Path, ct: Series) -> None:
    stripped = list(ct.headers)
    stripped[0] = pydicom.dcmread(ct.headers[0].filename, stop_before_pixels=True)
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        delattr(stripped[0], keyword)
    series = Series(stripped)
    _, _, seg_path, sr_path = encode_and_write(
        tmp_path, series, two_segment_map(ct.shape, 1, 2), [LEFT, RIGHT], omit_empty_frames=True
    )
    assert seg_path is not None
    assert "PatientBirthDate" not in stripped[0]  # the caller's header is left alone
    assert run_dciodvfy(seg_path) == []
    assert run_dciodvfy(sr_path) == []
    assert pydicom.dcmread(seg_path).PatientBirthDate == ""


def test_label_map_off_the_source_grid_is_refused(ct: Series) -> None:
    uids = result_uids(ct.headers[0].SeriesInstanceUID, MODEL, RULE)
    n, rows, cols = ct.shape
    for shape in ((n - 1, rows, cols), (n, rows, cols + 1), (rows, cols)):
        with pytest.raises(EncodeError):
            encode_seg(
                source_datasets=ct.headers,
                label_map=np.ones(shape, np.uint8),
                segments=[LEFT],
                model=MODEL,
                rule=RULE,
                identity=IDENTITY,
                uids=uids,
            )
    with pytest.raises(EncodeError):
        encode_seg(
            source_datasets=ct.headers,
            label_map=np.ones(ct.shape, np.float32),
            segments=[LEFT],
            model=MODEL,
            rule=RULE,
            identity=IDENTITY,
            uids=uids,
        )


def test_undeclared_label_value_is_an_inference_error(ct: Series) -> None:
    label_map = two_segment_map(ct.shape, 1, 5)
    with pytest.raises(InferenceError):
        segment_numbers(label_map, [LEFT, RIGHT])


def test_duplicate_label_values_are_refused() -> None:
    with pytest.raises(EncodeError):
        segment_numbers(np.zeros((1, 2, 2), np.uint8), [LEFT, LEFT])


def test_measure_counts_voxels_of_every_declared_segment(ct: Series) -> None:
    label_map = two_segment_map(ct.shape, 1, 2)
    voxel = voxel_volume_mm3(ct.headers)
    assert voxel == pytest.approx(0.8 * 0.8 * 2.5)
    measurements = measure(label_map, [LEFT, RIGHT, WHOLE_LUNG], voxel)
    assert [m.label_value for m in measurements] == [1, 2, 4]
    assert [m.voxel_count for m in measurements] == [
        int((label_map == 1).sum()),
        int((label_map == 2).sum()),
        0,
    ]
    for m in measurements:
        assert m.volume_cm3 == pytest.approx(m.voxel_count * voxel / 1000.0)


def test_display_cielab_matches_srgb_reference_values() -> None:
    # DICOM scaling (PS3.3 C.10.7.1.1): L* 0..100 -> 0..65535, a*/b* -128..127 -> 0..65535.
    def scaled(lab: tuple[float, float, float]) -> tuple[float, float, float]:
        return (lab[0] * 65535 / 100, (lab[1] + 128) * 65535 / 255, (lab[2] + 128) * 65535 / 255)

    for rgb, lab in [
        ((255, 255, 255), (100.0, 0.0, 0.0)),
        ((0, 0, 0), (0.0, 0.0, 0.0)),
        ((255, 0, 0), (53.2408, 80.0925, 67.2032)),  # sRGB D65 reference values
        ((0, 0, 255), (32.2970, 79.1875, -107.8602)),
    ]:
        np.testing.assert_allclose(display_cielab(rgb), scaled(lab), atol=40)


def test_write_dataset_writes_part10(tmp_path: Path, ct: Series) -> None:
    uids = result_uids(ct.headers[0].SeriesInstanceUID, MODEL, RULE)
    label_map = two_segment_map(ct.shape, 1, 2)
    seg = encode_seg(
        source_datasets=ct.headers,
        label_map=label_map,
        segments=[LEFT, RIGHT],
        model=MODEL,
        rule=RULE,
        identity=IDENTITY,
        uids=uids,
    )
    assert seg is not None
    path = tmp_path / "out.dcm"
    write_dataset(seg, path)
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    assert [p.name for p in tmp_path.iterdir()] == ["out.dcm"]  # no temporary file left behind
    assert pydicom.dcmread(path).SOPInstanceUID == uids.seg_sop_instance_uid


def test_frame_i_follows_source_dataset_i_in_any_order(tmp_path: Path, ct: Series) -> None:
    """The label map's first axis follows the given header order, even when that is descending z."""
    reversed_series = Series(list(reversed(ct.headers)))
    label_map = two_segment_map(ct.shape, 1, 2)[::-1].copy()
    label_map[0, 0, 0] = 1  # break the symmetry of the phantom mask along z
    seg, _, seg_path, sr_path = encode_and_write(
        tmp_path, reversed_series, label_map, [LEFT, RIGHT], omit_empty_frames=True
    )
    assert seg_path is not None
    assert_seg_round_trip(seg_path, reversed_series, label_map, segment_numbers(label_map, [LEFT, RIGHT]))
    assert run_dciodvfy(seg_path) == []
    assert run_dciodvfy(sr_path) == []


def test_sr_without_segment_list_takes_codes_from_the_seg(tmp_path: Path, mr: Series) -> None:
    segments = [LEFT, RIGHT, BRAIN]
    label_map = two_segment_map(mr.shape, LEFT.label_value, BRAIN.label_value)
    uids = result_uids(mr.headers[0].SeriesInstanceUID, MODEL, RULE)
    seg = encode_seg(
        label_map=label_map,
        segments=segments,
        source_datasets=mr.headers,
        model=MODEL,
        rule=RULE,
        identity=IDENTITY,
        uids=uids,
    )
    assert seg is not None
    measurements = measure(label_map, segments, voxel_volume_mm3(mr.headers))
    sr = encode_sr(
        seg=seg,
        measurements=measurements,
        source_datasets=mr.headers,
        model=MODEL,
        rule=RULE,
        identity=IDENTITY,
        uids=uids,
    )  # no segments=
    sr_path = tmp_path / "sr.dcm"
    write_dataset(sr, sr_path)
    assert run_dciodvfy(sr_path) == []

    report = hd.sr.srread(sr_path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    found = report.get_volumetric_roi_measurement_groups()
    assert [g.finding_type.value if g.finding_type else None for g in found] == [
        SCT_LEFT_LUNG.value,
        SCT_BRAIN.value,
    ]
    assert found[1].finding_sites[0].value.value == "69536005"  # anatomic region from the SEG
    (not_found,) = report.get_image_measurement_groups()
    assert not_found.tracking_identifier == RIGHT.label
    assert not_found.finding_type is None
    assert _presence(not_found) == "Absent"


def test_default_algorithm_family_is_the_dicom_ai_code() -> None:
    # CID 7162: DCM 123110 is "Artificial Intelligence" (123109 is "Manual Processing").
    ai = codes.DCM.ArtificialIntelligence
    family = ModelIdentity(name="m", version="1").family
    assert (family.value, family.scheme_designator, family.meaning) == (ai.value, "DCM", ai.meaning)


def test_single_component_patient_name_is_not_quoted_in_warnings(ct: Series) -> None:
    """highdicom warns about a one-component PN and quotes it; that text must not reach our logs."""
    headers = list(ct.headers)
    headers[0] = pydicom.dcmread(ct.headers[0].filename, stop_before_pixels=True)
    headers[0].PatientName = "SECRETNAME"
    series = Series(headers)
    label_map = two_segment_map(ct.shape, 1, 2)
    uids = result_uids(ct.headers[0].SeriesInstanceUID, MODEL, RULE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seg = encode_seg(
            label_map=label_map,
            segments=[LEFT, RIGHT],
            source_datasets=series.headers,
            model=MODEL,
            rule=RULE,
            identity=IDENTITY,
            uids=uids,
        )
        measurements = measure(label_map, [LEFT, RIGHT], voxel_volume_mm3(series.headers))
        encode_sr(
            seg=seg,
            measurements=measurements,
            segments=[LEFT, RIGHT],
            source_datasets=series.headers,
            model=MODEL,
            rule=RULE,
            identity=IDENTITY,
            uids=uids,
        )
    assert not [w for w in caught if "SECRETNAME" in str(w.message)]


def test_results_name_the_contributing_equipment_and_model(tmp_path: Path, ct: Series) -> None:
    """IHE AI Results: SEG and SR carry a Contributing Equipment item (Processing Equipment) naming the
    node and the model version."""
    label_map = two_segment_map(ct.shape, LEFT.label_value, RIGHT.label_value)
    _, _, seg_path, sr_path = encode_and_write(tmp_path, ct, label_map, [LEFT, RIGHT], omit_empty_frames=True)
    assert seg_path is not None
    for path in (seg_path, sr_path):
        items = pydicom.dcmread(path).ContributingEquipmentSequence
        # highdicom adds the source's acquisition equipment (109101) and itself; ours names node + model.
        [item] = [
            i
            for i in items
            if i.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
            and i.Manufacturer == IDENTITY.manufacturer
        ]
        assert f"{MODEL.name} {MODEL.version}" in list(item.SoftwareVersions)
        assert item.Manufacturer == IDENTITY.manufacturer
