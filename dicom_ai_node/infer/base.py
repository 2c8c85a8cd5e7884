"""What every segmentation model offers the worker (the inference stage's contract)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from dicom_ai_node.domain.results import ModelIdentity, SegmentSpec
from dicom_ai_node.infer.volume import Volume


class SegmentationModel(Protocol):
    """A warm model: constructed once by the registry, then called per series.

    `segment` returns a uint8 label map with the shape of `volume.array` (frames, rows, cols), on the
    exact source grid (any resampling/reorientation undone), 0 = background and each non-zero value one
    of `segments[*].label_value`. It raises InferenceError when it cannot produce a result.
    """

    identity: ModelIdentity
    segments: list[SegmentSpec]
    accepts_modalities: tuple[str, ...]

    def segment(self, volume: Volume) -> np.ndarray: ...
