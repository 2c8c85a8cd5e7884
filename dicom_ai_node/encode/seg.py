"""DICOM SEG (PS3.3 A.51, Segmentation IOD) for a label map on the exact source grid, via highdicom.

Choices that make the SEG show up in viewers (see docs/notes seg-sr.md):
- BINARY, Explicit VR Little Endian, one SEG per source series, frame i <-> source_datasets[i];
- only segments the model actually found are described, renumbered 1..N in the order of the model's
  segment list (a viewer shows an empty segment as a confusing empty entry; the SR says "not found");
- every segment: SegmentLabel, SCT category/type, AUTOMATIC + AlgorithmIdentificationSequence
  (model name/version/family), RecommendedDisplayCIELabValue, deterministic TrackingUID;
- the routing rule that caused the result is recorded as AlgorithmParameters of the algorithm
  identification ("rule_id=<id>,rule_version=<n>") and in ContentDescription ("rule <id> v<n>").
- highdicom sets ReferencedSeriesSequence (OHIF needs it) and copies patient/study identity from the
  first source header. Source headers may be read with `stop_before_pixels`: the pixel data is not used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dicom_ai_node.domain.results import (
    ModelIdentity,
    OutputIdentity,
    ResultUids,
    RuleIdentity,
    SegmentSpec,
)
from dicom_ai_node.encode._common import (
    LONG_STRING_MAX,
    contributing_equipment,
    hd_code,
    no_phi_warnings,
    rule_parameters,
    series_description,
    with_slice_thickness,
    with_type2_identity,
)
from dicom_ai_node.encode.measure import label_counts
from dicom_ai_node.encode.uids import segment_tracking_uid
from dicom_ai_node.errors import EncodeError, InferenceError


def segment_numbers(
    label_map: npt.NDArray[np.integer], segments: Sequence[SegmentSpec]
) -> list[tuple[int, SegmentSpec]]:
    """(SEG segment number, spec) for each declared segment present in `label_map`, numbered 1..N.

    Numbers follow the order of `segments`; empty segments get no number. Raises InferenceError when
    the label map holds a value that no segment declares (model output and manifest disagree).
    """
    _check_segment_specs(segments)
    counts = label_counts(label_map)
    declared = {spec.label_value for spec in segments}
    undeclared = sorted(set(counts) - declared)
    if undeclared:
        raise InferenceError(f"label map contains undeclared label values {undeclared}")
    present = [spec for spec in segments if counts.get(spec.label_value, 0) > 0]
    return [(number, spec) for number, spec in enumerate(present, start=1)]


def display_cielab(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """sRGB (0..255) to a DICOM-scaled CIELab triplet (PS3.3 C.10.7.1.1) for RecommendedDisplayCIELabValue."""
    return tuple(hd.color.CIELabColor.from_rgb(*rgb).value)  # type: ignore[return-value]


SegFormat = Literal["auto", "binary", "fractional", "labelmap"]
FRACTIONAL_MAX = 255


def segmentation_type(seg_format: SegFormat, pixels_per_frame: int) -> str:
    """The SegmentationType to write (PS3.3 C.8.20.2).

    - labelmap: LABELMAP (+RLE), 12-80x smaller but new (2024, SOP class ...66.7): opt-in only.
    - binary / fractional: as asked.
    - auto: BINARY, except FRACTIONAL OCCUPANCY (0 or 255 per pixel) when a frame's pixel count is not a
      multiple of 8. BINARY frames are bit-packed back to back, so such frames do not start on byte
      boundaries; OHIF 3.13 then fails to load the SEG or misplaces pixels (tests/e2e/test_ohif_viewer.py
      found this with the 217 x 181 ch2 brain MR), while 8-bit FRACTIONAL frames display pixel-exact.
    """
    if seg_format == "auto":
        return "BINARY" if pixels_per_frame % 8 == 0 else "FRACTIONAL"
    return seg_format.upper()


def _one_hot(segment_array: npt.NDArray[np.integer], n_segments: int) -> npt.NDArray[np.float32]:
    """(frames, rows, cols) segment numbers -> (frames, rows, cols, segments) occupancy 0.0 / 1.0."""
    out = np.zeros((*segment_array.shape, n_segments), dtype=np.float32)
    for index in range(n_segments):
        out[..., index] = segment_array == index + 1
    return out


def encode_seg(
    *,
    source_datasets: Sequence[Dataset],
    label_map: npt.NDArray[np.integer],
    segments: Sequence[SegmentSpec],
    model: ModelIdentity,
    rule: RuleIdentity,
    identity: OutputIdentity,
    uids: ResultUids,
    omit_empty_frames: bool = True,
    revision: int = 1,
    seg_format: SegFormat = "auto",
) -> Dataset | None:
    """Encode `label_map` (frames, rows, cols; 0 = background) as a BINARY SEG of the source series.

    `source_datasets` are the source headers in the order of the label map's first axis.
    Returns None when no declared segment has a voxel: there is nothing to show, and the caller
    writes only the SR (which reports every segment as not found).
    """
    _check_grid(source_datasets, label_map)
    kind = segmentation_type(seg_format, int(label_map.shape[1]) * int(label_map.shape[2]))
    numbered = segment_numbers(label_map, segments)
    if not numbered:
        return None

    # Label values -> SEG segment numbers 1..N (absent labels stay 0).
    lut_size = max(int(label_map.max()), max(s.label_value for s in segments)) + 1
    lut = np.zeros(lut_size, dtype=np.uint8 if len(numbered) <= 0xFF else np.uint16)
    for number, spec in numbered:
        lut[spec.label_value] = number
    if label_map.dtype == lut.dtype and all(number == spec.label_value for number, spec in numbered):
        # The label values already are the segment numbers: lut[label_map] would be a full-size copy
        # (157 MB for 600 slices of 512 x 512) holding the same values.
        segment_array = label_map
    else:
        segment_array = lut[label_map]

    algorithm = hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=hd_code(model.family),
        version=model.version,
        parameters=rule_parameters(rule),
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.label,
            segmented_property_category=hd_code(spec.category),
            segmented_property_type=hd_code(spec.property_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=segment_tracking_uid(uids, spec.label_value),
            tracking_id=spec.label,
            anatomic_regions=([hd_code(spec.anatomic_region)] if spec.anatomic_region is not None else None),
            display_color=hd.color.CIELabColor.from_rgb(*spec.rgb),
        )
        for number, spec in numbered
    ]
    try:
        with no_phi_warnings():
            seg = hd.seg.Segmentation(
                source_images=[
                    with_type2_identity(with_slice_thickness(source_datasets)),
                    *source_datasets[1:],
                ],
                pixel_array=_one_hot(segment_array, len(numbered)) if kind == "FRACTIONAL" else segment_array,
                segmentation_type=hd.seg.SegmentationTypeValues[kind],
                # FRACTIONAL: highdicom's defaults, OCCUPANCY with maximum value 255 (FRACTIONAL_MAX).
                segment_descriptions=descriptions,
                series_instance_uid=uids.seg_series_instance_uid,
                series_number=identity.seg_series_number,
                sop_instance_uid=uids.seg_sop_instance_uid,
                instance_number=1,
                manufacturer=identity.manufacturer,
                manufacturer_model_name=identity.manufacturer_model_name,
                software_versions=identity.software_versions,
                device_serial_number=identity.device_serial_number,
                content_description=f"rule {rule.rule_id} v{rule.rule_version}"[:LONG_STRING_MAX],
                # Type 3 in the Segmentation Image Module: omitted; an automatic result has no human
                # creator, and this must never carry PHI.
                content_creator_name=None,
                transfer_syntax_uid=RLELossless if kind == "LABELMAP" else ExplicitVRLittleEndian,
                omit_empty_frames=omit_empty_frames,
                series_description=series_description(
                    identity.seg_series_description_prefix, model, revision
                ),
                institution_name=identity.institution_name or None,
                contributing_equipment=contributing_equipment(identity, model),
            )
    except (ValueError, TypeError, AttributeError) as exc:
        series_uid = source_datasets[0].get("SeriesInstanceUID", "?")
        raise EncodeError(f"cannot encode SEG for series {series_uid}: {exc}") from exc
    if identity.station_name:
        # Type 3 (General Equipment) that highdicom's constructor does not take.
        seg.StationName = identity.station_name
    return seg


def _check_segment_specs(segments: Sequence[SegmentSpec]) -> None:
    values = [spec.label_value for spec in segments]
    if len(set(values)) != len(values):
        raise EncodeError(f"duplicate label values in segment list: {values}")
    if any(not 0 < v <= 0xFFFF for v in values):
        raise EncodeError(f"label values must be in 1..65535: {values}")


def _check_grid(source_datasets: Sequence[Dataset], label_map: npt.NDArray[np.integer]) -> None:
    """The label map must lie on the exact source grid: one frame per source instance, same matrix."""
    if not source_datasets:
        raise EncodeError("no source datasets")
    if label_map.ndim != 3:
        raise EncodeError(f"label map must be 3-D (frames, rows, columns), got shape {label_map.shape}")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise EncodeError(f"label map must have an integer dtype, not {label_map.dtype}")
    if label_map.shape[0] != len(source_datasets):
        raise EncodeError(
            f"label map has {label_map.shape[0]} frames but the series has {len(source_datasets)} instances"
        )
    for ds in source_datasets:
        if (int(ds.Rows), int(ds.Columns)) != label_map.shape[1:]:
            raise EncodeError(
                f"label map frames are {label_map.shape[1:]} but instance {ds.SOPInstanceUID} is "
                f"{ds.Rows}x{ds.Columns}"
            )
