"""Segment volumes on the source grid (pure numpy; what the SR reports)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from dicom_ai_node.domain.results import SegmentMeasurement, SegmentSpec

_COUNT_CHUNK = 1 << 22


def measure(
    label_map: npt.NDArray[np.integer], segments: Sequence[SegmentSpec], voxel_volume_mm3: float
) -> list[SegmentMeasurement]:
    """One measurement per declared segment, in the order of `segments` (0 voxels means not found).

    volume_cm3 = voxel_count * voxel_volume_mm3 / 1000.
    """
    if voxel_volume_mm3 <= 0:
        raise ValueError("voxel volume must be positive")
    counts = label_counts(label_map)
    return [
        SegmentMeasurement(
            label_value=spec.label_value,
            label=spec.label,
            voxel_count=counts.get(spec.label_value, 0),
            volume_cm3=counts.get(spec.label_value, 0) * voxel_volume_mm3 / 1000.0,
        )
        for spec in segments
    ]


def label_counts(label_map: npt.NDArray[np.integer]) -> dict[int, int]:
    """Voxel count of every non-zero label value present in the label map."""
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"label map must have an integer dtype, not {label_map.dtype}")
    if label_map.size and int(label_map.min()) < 0:
        raise ValueError("label map must not contain negative values")
    flat = label_map.reshape(-1)
    bins = np.zeros(int(flat.max()) + 1 if flat.size else 1, dtype=np.int64)
    # bincount casts its input to intp: go in chunks so a large uint8 map is not copied 8x at once.
    for start in range(0, flat.size, _COUNT_CHUNK):
        chunk = np.bincount(flat[start : start + _COUNT_CHUNK], minlength=bins.size)
        bins += chunk
    return {value: int(count) for value, count in enumerate(bins.tolist()) if value != 0 and count > 0}
