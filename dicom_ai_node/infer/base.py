"""What every model offers the worker (the inference stage's contract).

Two tasks exist. A segmentation model returns a label map on the exact source grid; a classification
model returns one probability per finding it knows. The worker branches on `task`: segmentation results
become a DICOM SEG plus a TID 1500 SR with volumes, classification results an SR with qualitative
evaluations (finding + probability) only.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import numpy as np

from dicom_ai_node.domain.results import FindingResult, FindingSpec, ModelIdentity, SegmentSpec
from dicom_ai_node.infer.volume import Volume

Task = Literal["segmentation", "classification"]


@runtime_checkable
class SegmentationModel(Protocol):
    """A warm model: constructed once by the registry, then called per series.

    `segment` returns a uint8 label map with the shape of `volume.array` (frames, rows, cols), on the
    exact source grid (any resampling/reorientation undone), 0 = background and each non-zero value one
    of `segments[*].label_value`. It raises InferenceError when it cannot produce a result.
    """

    task: Literal["segmentation"]
    identity: ModelIdentity
    segments: list[SegmentSpec]
    accepts_modalities: tuple[str, ...]

    def segment(self, volume: Volume) -> np.ndarray: ...


@runtime_checkable
class ClassificationModel(Protocol):
    """A warm classifier: `classify` returns one FindingResult per entry of `findings`, in that order."""

    task: Literal["classification"]
    identity: ModelIdentity
    findings: list[FindingSpec]
    accepts_modalities: tuple[str, ...]

    def classify(self, volume: Volume) -> list[FindingResult]: ...


Model = SegmentationModel | ClassificationModel
