"""Tiny models for the inference host tests: cheap to load (no torch), each misbehaving in one way.

`tiny_registry` is module level so the spawn start method can pickle it by reference; the child imports
this module and calls it there.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Literal

import numpy as np
import pydicom

from dicom_ai_node.devtools.synthetic import FAKE_PATIENT_ID, FAKE_PATIENT_NAME
from dicom_ai_node.domain.results import (
    SCT_ANATOMICAL_STRUCTURE,
    SCT_LUNG,
    CodedConcept,
    FindingResult,
    FindingSpec,
    ModelIdentity,
    SegmentSpec,
)
from dicom_ai_node.errors import InferenceError
from dicom_ai_node.infer.registry import ModelRegistry
from dicom_ai_node.infer.volume import Volume

THRESHOLD = 100.0
FOUND_NOTHING = "no lung found in the phantom"
BRIGHT = FindingSpec(CodedConcept("TEST001", "99TEST", "Bright voxels"), threshold=0.5)


def _identity(name: str) -> ModelIdentity:
    # A fresh token per construction: equal tokens across calls prove the model stayed warm.
    return ModelIdentity(name, "1.0", description=f"instance {uuid.uuid4().hex}")


class ThresholdModel:
    """Label 1 where the volume exceeds THRESHOLD; reads the series UID as the real models do."""

    task: Literal["segmentation"] = "segmentation"
    accepts_modalities: tuple[str, ...] = ("CT",)

    def __init__(self) -> None:
        self.identity = _identity("threshold")
        self.segments = [SegmentSpec(1, "Lung", SCT_ANATOMICAL_STRUCTURE, SCT_LUNG, (80, 180, 250))]

    def segment(self, volume: Volume) -> np.ndarray:
        if not volume.series_instance_uid:
            raise InferenceError("no series UID")
        return (volume.array > THRESHOLD).astype(np.uint8)


class BrightClassifier:
    """The fraction of voxels above THRESHOLD, as the probability of one finding."""

    task: Literal["classification"] = "classification"
    accepts_modalities: tuple[str, ...] = ("CT",)

    def __init__(self) -> None:
        self.identity = _identity("bright")
        self.findings = [BRIGHT]

    def classify(self, volume: Volume) -> list[FindingResult]:
        return [FindingResult(BRIGHT, float((volume.array > THRESHOLD).mean()))]


class _Segmenter:
    task: Literal["segmentation"] = "segmentation"
    accepts_modalities: tuple[str, ...] = ("CT",)

    def __init__(self) -> None:
        self.identity = _identity(type(self).__name__)
        self.segments: list[SegmentSpec] = []


class HangingModel(_Segmenter):
    def segment(self, volume: Volume) -> np.ndarray:
        time.sleep(3600)
        raise AssertionError("unreachable")


class SelfKillingModel(_Segmenter):
    """Dies like the OOM killer's victim: SIGKILL, no chance to answer."""

    def segment(self, volume: Volume) -> np.ndarray:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
        raise AssertionError("unreachable")


class ExitingModel(_Segmenter):
    def segment(self, volume: Volume) -> np.ndarray:
        os._exit(3)


class FailingModel(_Segmenter):
    def segment(self, volume: Volume) -> np.ndarray:
        raise InferenceError(FOUND_NOTHING)


class BuggyModel(_Segmenter):
    def segment(self, volume: Volume) -> np.ndarray:
        raise KeyError("spacing")


class InPlaceModel(_Segmenter):
    """Normalises its input in place, which would corrupt the pixels the worker encodes afterwards."""

    def segment(self, volume: Volume) -> np.ndarray:
        volume.array -= volume.array.mean()
        return np.zeros(volume.shape, np.uint8)


def tiny_registry() -> ModelRegistry:
    registry = ModelRegistry()
    registry.register("threshold", ThresholdModel)
    registry.register("bright", BrightClassifier)
    registry.register("hang", HangingModel)
    registry.register("crash", SelfKillingModel)
    registry.register("exit", ExitingModel)
    registry.register("fails", FailingModel)
    registry.register("buggy", BuggyModel)
    registry.register("inplace", InPlaceModel)
    return registry


SERIES_UID = "1.2.826.0.1.3680043.8.498.424242"


def make_volume(frames: int = 4, rows: int = 16, cols: int = 16) -> Volume:
    """A small CT-like volume: a ramp, so half the voxels exceed THRESHOLD; the header carries fake PHI
    (to check that nothing of it is logged)."""
    array = np.linspace(0, 2 * THRESHOLD, frames * rows * cols, dtype=np.float32).reshape(frames, rows, cols)
    header = pydicom.Dataset()
    header.SeriesInstanceUID = SERIES_UID
    header.Modality = "CT"
    header.PatientName = FAKE_PATIENT_NAME
    header.PatientID = FAKE_PATIENT_ID
    return Volume(
        array=array,
        datasets=[header],
        paths=[],
        spacing=(2.5, 0.8, 0.8),
        affine_lps=np.diag([0.8, 0.8, 2.5, 1.0]),
        modality="CT",
    )
