"""Reference segmentations (DICOM SEG or a label image) as one boolean mask per model segment, on the
exact grid of the source volume the model sees.

Which reference segment is which model segment (first match wins):
1. dataset.yaml `segments:` maps a reference segment (SEG SegmentLabel or segment number; label image
   value) to a model segment (its label or label value), or to null to ignore it;
2. a SEG segment whose SegmentedPropertyTypeCodeSequence (value + scheme) equals a model segment's;
3. a SEG segment whose SegmentLabel equals a model segment's label (case-insensitive);
4. a label image value equal to a model segment's label value.
Several reference segments mapped to one model segment are united (e.g. lesions 1..n -> "Lesion").
Reference segments that match nothing are ignored and named in the case's notes.

Grids: a SEG that references the source instances is read frame by frame by SOPInstanceUID (exact,
independent of file or frame order). A SEG that references other instances of the same frame of
reference, or a label image on another grid, is resampled nearest-neighbour by patient coordinates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dicom_ai_node.domain.results import SegmentSpec
from dicom_ai_node.encode.seg_reader import SegmentationReader
from dicom_ai_node.errors import InvalidDicomError, NodeError
from dicom_ai_node.evaluate.images import read_image_grid
from dicom_ai_node.infer.volume import Volume

SegmentMapping = Mapping[int | str, int | str | None]
BoolArray = npt.NDArray[np.bool_]

# Same grid when the affines agree to a micrometre (header rounding), else resample.
_SAME_GRID_ATOL_MM = 1e-3


class DatasetError(NodeError):
    """The evaluation dataset (layout, reference, labels, dataset.yaml) is missing or malformed."""


@dataclass
class Reference:
    """Reference masks keyed by model label value; `notes` say what was ignored or resampled."""

    masks: dict[int, BoolArray]
    source: str
    notes: list[str] = field(default_factory=list)


def resolve_model_segment(target: int | str, segments: Sequence[SegmentSpec]) -> SegmentSpec:
    """The model segment a dataset.yaml target names (label value or label); DatasetError if none."""
    for spec in segments:
        if isinstance(target, int) and spec.label_value == target:
            return spec
        if isinstance(target, str) and spec.label.casefold() == target.casefold():
            return spec
    known = ", ".join(f"{s.label_value}={s.label}" for s in segments)
    raise DatasetError(f"dataset.yaml segments: {target!r} is no segment of the model (it has {known})")


def seg_reference(
    seg_path: Path, volume: Volume, segments: Sequence[SegmentSpec], mapping: SegmentMapping
) -> Reference:
    """Read a reference DICOM SEG onto `volume`'s grid."""
    try:
        seg = SegmentationReader(seg_path)
    except InvalidDicomError as exc:
        raise DatasetError(str(exc)) from exc
    reference = Reference(masks={}, source=f"SEG {seg.sop_instance_uid}")
    groups: dict[int, list[int]] = {}
    for segment in seg.segments:
        number, label = segment.number, segment.label
        if _ignored(mapping, (label, number)):
            continue
        spec = _match(
            mapping, keys=(label, number), segments=segments, code=segment.property_type, label=label
        )
        if spec is None:
            reference.notes.append(f"reference segment {number} '{label}' matches no model segment: ignored")
        else:
            groups.setdefault(spec.label_value, []).append(number)
    if not groups:
        return reference
    numbers = sorted({n for group in groups.values() for n in group})
    channels = _seg_channels(seg, seg_path, volume, numbers, reference)
    for label_value, group in groups.items():
        reference.masks[label_value] = np.any(channels[..., [numbers.index(n) for n in group]], axis=-1)
    return reference


def label_image_reference(
    path: Path, volume: Volume, segments: Sequence[SegmentSpec], mapping: SegmentMapping
) -> Reference:
    """Read a NIfTI/NRRD label image (0 = background) onto `volume`'s grid."""
    labels, affine = read_image_grid(path)
    if np.issubdtype(labels.dtype, np.floating):
        if not np.array_equal(labels, np.round(labels)):
            raise DatasetError(f"{path.name}: label image holds non-integer values")
    labels = labels.astype(np.int64, copy=False)
    reference = Reference(masks={}, source=path.name)
    if labels.shape != volume.shape or not np.allclose(affine, volume.affine_lps, atol=_SAME_GRID_ATOL_MM):
        labels = resample_nearest(labels, _array_affine(affine), volume)
        reference.notes.append(f"{path.name} is on another grid than the image: resampled nearest-neighbour")
    for value in (int(v) for v in np.unique(labels) if v != 0):
        if _ignored(mapping, (value,)):
            continue
        spec = _match(mapping, keys=(value,), segments=segments, code=None, label=None, value=value)
        if spec is None:
            reference.notes.append(f"reference label value {value} matches no model segment: ignored")
            continue
        mask = labels == value
        previous = reference.masks.get(spec.label_value)
        reference.masks[spec.label_value] = mask if previous is None else previous | mask
    return reference


def resample_nearest(source: np.ndarray, source_affine: np.ndarray, volume: Volume) -> np.ndarray:
    """Nearest-neighbour sample of `source` (array axes 0..2, optional channel axes after) at the voxel
    centres of `volume`; `source_affine` maps (axis0, axis1, axis2, 1) to LPS mm. Outside = 0."""
    to_source = np.linalg.inv(source_affine) @ _array_affine(volume.affine_lps)
    frames, rows, cols = volume.shape
    out = np.zeros((frames, rows, cols, *source.shape[3:]), dtype=source.dtype)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    # One frame at a time keeps the index arrays at rows x cols, whatever the series length.
    for f in range(frames):
        points = (
            to_source[:3, 0, None, None] * f
            + to_source[:3, 1, None, None] * r
            + to_source[:3, 2, None, None] * c
            + to_source[:3, 3, None, None]
        )
        index = np.rint(points).astype(np.int64)
        inside = np.all([(index[a] >= 0) & (index[a] < source.shape[a]) for a in range(3)], axis=0)
        out[f][inside] = source[index[0][inside], index[1][inside], index[2][inside]]
    return out


def _array_affine(affine_lps: np.ndarray) -> np.ndarray:
    """(col, row, frame, 1) -> LPS affine as (frame, row, col, 1) -> LPS: the array's own axis order."""
    return affine_lps[:, [2, 1, 0, 3]]


def _ignored(mapping: SegmentMapping, keys: tuple[int | str, ...]) -> bool:
    """dataset.yaml maps this reference segment to null: leave it out without a note."""
    return any(key in mapping and mapping[key] is None for key in keys)


def _match(
    mapping: SegmentMapping,
    *,
    keys: tuple[int | str, ...],
    segments: Sequence[SegmentSpec],
    code: tuple[str, str] | None,
    label: str | None,
    value: int | None = None,
) -> SegmentSpec | None:
    for key in keys:
        if key in mapping:
            target = mapping[key]
            return None if target is None else resolve_model_segment(target, segments)
    for spec in segments:
        if code is not None and (spec.property_type.value, spec.property_type.scheme_designator) == code:
            return spec
    for spec in segments:
        if label is not None and spec.label.casefold() == label.casefold():
            return spec
        if value is not None and spec.label_value == value:
            return spec
    return None


def _seg_channels(
    seg: SegmentationReader, seg_path: Path, volume: Volume, numbers: list[int], reference: Reference
) -> BoolArray:
    """(frames, rows, cols, len(numbers)) occupancy of the SEG segments `numbers` on the volume grid."""
    sop_uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    try:
        if seg.referenced_sop_instance_uids & set(sop_uids):
            pixels = seg.pixels_by_source_instance(sop_uids, numbers)
        elif seg.frame_of_reference_uid == str(volume.datasets[0].get("FrameOfReferenceUID", "-")):
            array, affine = seg.volume(numbers)
            pixels = resample_nearest(array, affine, volume)
            reference.notes.append("the SEG references other instances: mapped by patient coordinates")
        else:
            raise DatasetError(
                f"{seg_path.name}: SEG {seg.sop_instance_uid} references neither the instances nor the frame "
                f"of reference of series {volume.series_instance_uid}"
            )
    except InvalidDicomError as exc:
        raise DatasetError(str(exc)) from exc
    # FRACTIONAL SEGs come back as occupancy 0..1: a voxel is in the segment from half occupancy on.
    binary: BoolArray = pixels >= 0.5 if np.issubdtype(pixels.dtype, np.floating) else pixels > 0
    return binary
