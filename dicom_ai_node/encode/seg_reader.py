"""Read a DICOM SEG someone else wrote (e.g. an evaluation reference) through highdicom.

highdicom stays inside encode/ (docs/architecture.md), so readers elsewhere get plain data from here:
the segment descriptions and the segment occupancy either frame by frame for given source instances or
as a volume with its affine. Every failure is an `InvalidDicomError` naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt

from dicom_ai_node.errors import InvalidDicomError

# What highdicom raises for a SEG it cannot read or map (bad attributes, missing frames, odd geometry).
_READ_ERRORS = (ValueError, AttributeError, KeyError, TypeError, OSError)
_MAP_ERRORS = (ValueError, RuntimeError, KeyError, AttributeError, IndexError)


@dataclass(frozen=True)
class SegSegment:
    """One segment of a SEG (PS3.3 C.8.20.4, Segment Sequence item)."""

    number: int
    label: str
    # SegmentedPropertyTypeCodeSequence as (CodeValue, CodingSchemeDesignator).
    property_type: tuple[str, str]


class SegmentationReader:
    """A SEG read from `path`; `segments` lists its segments in file order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._seg = hd.seg.segread(path)
        except _READ_ERRORS as exc:
            raise InvalidDicomError(f"{path.name}: not a readable DICOM SEG: {exc}") from exc
        self.sop_instance_uid = str(self._seg.SOPInstanceUID)
        self.frame_of_reference_uid = str(self._seg.get("FrameOfReferenceUID", ""))
        self.segments = [self._segment(int(number)) for number in self._seg.segment_numbers]
        # (study, series, instance) triples; only the instance UIDs matter to a reader.
        self.referenced_sop_instance_uids = frozenset(
            str(uids[2]) for uids in self._seg.get_source_image_uids()
        )

    def _segment(self, number: int) -> SegSegment:
        description = self._seg.get_segment_description(number)
        prop = description.segmented_property_type
        return SegSegment(
            number=number,
            label=str(description.segment_label),
            property_type=(str(prop.value), str(prop.scheme_designator)),
        )

    def pixels_by_source_instance(
        self, sop_instance_uids: Sequence[str], segment_numbers: Sequence[int]
    ) -> npt.NDArray[Any]:
        """(frames, rows, cols, segments) occupancy, one frame per source instance in the given order.

        Frames of source instances the SEG does not list were omitted as empty (highdicom writes SEGs
        that way): they read as zeros.
        """
        try:
            pixels = self._seg.get_pixels_by_source_instance(
                list(sop_instance_uids),
                segment_numbers=list(segment_numbers),
                assert_missing_frames_are_empty=True,
            )
        except _MAP_ERRORS as exc:
            raise self._cannot_map(exc) from exc
        return _with_channel_axis(np.asarray(pixels))

    def volume(self, segment_numbers: Sequence[int]) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
        """(array (slices, rows, cols, segments), 4x4 affine in LPS) of the SEG as a regular volume."""
        try:
            seg_volume = self._seg.get_volume(segment_numbers=list(segment_numbers))
        except _MAP_ERRORS as exc:
            raise self._cannot_map(exc) from exc
        return _with_channel_axis(np.asarray(seg_volume.array)), np.asarray(
            seg_volume.affine, dtype=np.float64
        )

    def _cannot_map(self, exc: Exception) -> InvalidDicomError:
        return InvalidDicomError(
            f"{self.path.name}: cannot map SEG {self.sop_instance_uid} onto the series: {exc}"
        )


def _with_channel_axis(pixels: npt.NDArray[Any]) -> npt.NDArray[Any]:
    # One segment requested: some readers drop the channel axis.
    return pixels[..., None] if pixels.ndim == 3 else pixels
