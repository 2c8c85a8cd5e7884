"""Running one model on one volume, and the in-process host (`inference_timeout_s: 0`).

`run_model` is the one code path both hosts use: the child process of `InferenceHost` calls it, and so
does `InProcessHost` in the worker's own process.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import numpy as np

from dicom_ai_node.domain.results import FindingResult, FindingSpec, ModelIdentity, SegmentSpec
from dicom_ai_node.errors import InferenceError, NodeError
from dicom_ai_node.infer.base import Task
from dicom_ai_node.infer.registry import ModelRegistry
from dicom_ai_node.infer.volume import Volume

log = logging.getLogger(__name__)


class ClosingHost:
    """`with host:` closes it; both hosts share this."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass
class InferenceResult:
    """What one model call produced, with the model's metadata (the worker holds no model object).

    Segmentation: `label_map` (uint8 (frames, rows, cols) on the source grid) and `segments`;
    classification: `findings` and `finding_specs`. `seconds` is the model call alone (loading excluded),
    `device` where it ran.
    """

    task: Task
    label_map: np.ndarray | None
    findings: list[FindingResult] | None
    identity: ModelIdentity
    segments: list[SegmentSpec]
    finding_specs: list[FindingSpec]
    seconds: float
    device: str


def run_model(registry: ModelRegistry, model_name: str, volume: Volume) -> InferenceResult:
    """Run the (warm) model `model_name` on `volume`; the same code serves both hosts."""
    model = registry.get(model_name)
    accepts = tuple(getattr(model, "accepts_modalities", ()))
    if accepts and volume.modality not in accepts:
        # A rule that routes the wrong images to a model is a configuration error, not a result.
        raise InferenceError(
            f"model {model_name} accepts {', '.join(accepts)}, series {volume_series_uid(volume)} is "
            f"{volume.modality or 'without Modality'}: check the routing rule"
        )
    started = time.perf_counter()
    label_map: np.ndarray | None = None
    findings: list[FindingResult] | None = None
    if model.task == "segmentation":
        label_map = np.asarray(model.segment(volume))
    elif model.task == "classification":
        findings = list(model.classify(volume))
    else:
        raise InferenceError(f"model {model_name} has an unknown task {model.task!r}")
    seconds = time.perf_counter() - started
    return InferenceResult(
        task=model.task,
        label_map=label_map,
        findings=findings,
        identity=model.identity,
        segments=list(getattr(model, "segments", [])),
        finding_specs=list(getattr(model, "findings", [])),
        seconds=seconds,
        # Torch-backed models record the device they resolved; the others (classical image processing)
        # run on the CPU.
        device=str(getattr(model, "device", "cpu")),
    )


class InProcessHost(ClosingHost):
    """Runs models in this process without a time limit (`inference_timeout_s: 0`): tests, debugging.

    Same API and error contract as InferenceHost: node errors pass through, anything else becomes an
    InferenceError naming the original type.
    """

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._lock = threading.Lock()

    def run(self, model_name: str, volume: Volume) -> InferenceResult:
        series_uid = volume_series_uid(volume)
        with self._lock:
            try:
                result = run_model(self.registry, model_name, volume)
            except NodeError:
                raise
            except Exception as exc:
                raise InferenceError(
                    f"model {model_name} failed on series {series_uid}: {type(exc).__name__}: {exc}"
                ) from exc
        log_result(model_name, series_uid, result, "in-process")
        return result

    def close(self) -> None:
        """Nothing to stop; present so both hosts can be used alike."""


def volume_series_uid(volume: Volume) -> str:
    try:
        return volume.series_instance_uid
    except (IndexError, AttributeError):
        return "<unknown series>"


def log_result(model_name: str, series_uid: str, result: InferenceResult, where: str) -> None:
    # Identifiers only: never patient name, ID or birth date.
    log.info(
        "model %s on series %s: %.2f s on %s (%s)",
        model_name,
        series_uid,
        result.seconds,
        result.device,
        where,
    )
