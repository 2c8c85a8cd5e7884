"""`evaluate`: run one registered model over a local validation set and score it against the reference.

Stages per case (the node's own: volume loader, warm model from the registry), timed separately:
load (series/image + reference onto the source grid) -> inference -> metrics -> overlay montage.
A case that fails (unreadable series, model error, reference that does not fit) is recorded with its
error and the run goes on: one bad case must not cost the other results, and the failure is itself a
finding for the report. Only the dataset as a whole (layout, unknown model, task mismatch) stops it.
"""

from __future__ import annotations

import datetime
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dicom_ai_node import __version__
from dicom_ai_node.domain.results import FindingSpec, SegmentSpec
from dicom_ai_node.errors import ConfigError, ModelNotFoundError
from dicom_ai_node.evaluate import metrics, plots
from dicom_ai_node.evaluate.dataset import (
    Case,
    EvaluationDataset,
    load_classification_volume,
    load_segmentation_case,
    match_findings,
    open_dataset,
    truth_by_finding,
)
from dicom_ai_node.evaluate.images import is_image_file
from dicom_ai_node.evaluate.reference import DatasetError, resolve_model_segment
from dicom_ai_node.evaluate.report import finish_report
from dicom_ai_node.infer.base import ClassificationModel, Model, SegmentationModel
from dicom_ai_node.infer.manifest import ModelManifest, sha256_of
from dicom_ai_node.infer.registry import ModelRegistry, default_registry, select_device
from dicom_ai_node.infer.volume import Volume, voxel_volume_mm3

log = logging.getLogger(__name__)

SCHEMA = "dicom-ai-node/evaluation/1"


def evaluate(
    model_name: str,
    dataset_dir: Path,
    out_dir: Path,
    registry: ModelRegistry | None = None,
    device: str = "auto",
    *,
    progress: bool = True,
    overlays: bool = True,
) -> dict[str, Any]:
    """Evaluate `model_name` on the dataset in `dataset_dir`; write evaluation.json, report.md,
    report.html and PNGs to `out_dir` and return what evaluation.json holds.

    Raises ModelNotFoundError for an unknown model, DatasetError for a missing/empty/malformed dataset
    or one of the wrong task. Per-case failures are recorded in the result (status "failed").
    """
    dataset = open_dataset(Path(dataset_dir))
    registry = registry if registry is not None else default_registry(device)
    if model_name not in registry.names():
        raise ModelNotFoundError(
            f"no model named '{model_name}' (known: {', '.join(registry.names()) or 'none'})"
        )
    manifest = (
        registry.manifest(model_name) if any(m.name == model_name for m in registry.manifests()) else None
    )
    model = registry.get(model_name)
    if model.task != dataset.task:
        raise DatasetError(
            f"dataset {dataset.root} is a {dataset.task} dataset ({dataset.layout} layout) but model "
            f"{model_name} does {model.task}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.UTC)
    default_modality = model.accepts_modalities[0] if model.accepts_modalities else "OT"
    names = _file_names([c.name for c in dataset.cases])
    if model.task == "segmentation":
        # `task` is the protocols' tag: mypy narrows `model` on it, no structural isinstance needed.
        for target in dataset.config.segments.values():
            if target is not None:
                resolve_model_segment(target, model.segments)  # a typo fails before hours of inference
        cases = [
            _segmentation_case(model, case, dataset, default_modality, out_dir, names[case.name], overlays)
            for case in _progress(dataset, model_name, progress)
        ]
        summary: dict[str, Any] = {"labels": _segmentation_summary(model.segments, cases)}
    else:
        names_in_csv = sorted({f for case in dataset.cases for f in case.truth})
        matched, warnings = match_findings(names_in_csv, model.findings, dataset.config)
        dataset.warnings.extend(warnings)
        cases = [
            _classification_case(model, case, dataset, default_modality, matched)
            for case in _progress(dataset, model_name, progress)
        ]
        summary = {"findings": _classification_summary(model.findings, cases)}
    evaluated = [c for c in cases if c["status"] == "ok"]
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "tool": {"name": "dicom-ai-node", "version": __version__},
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": select_device(device),
        "task": model.task,
        "model": _model_info(model, manifest),
        "dataset": {
            "name": dataset.name,
            "description": dataset.config.description,
            "path": str(dataset.root.resolve()),
            "layout": dataset.layout,
            "n_cases": len(cases),
            "n_evaluated": len(evaluated),
            "n_failed": len(cases) - len(evaluated),
            "modalities": sorted({str(c.get("modality", "")) for c in evaluated}),
            "missing_reference": dataset.config.missing_reference,
            "warnings": dataset.warnings,
        },
        **summary,
        "cases": cases,
        "timing_s": {
            "total": round(sum(c["timing_s"]["total"] for c in cases), 3),
            "mean_inference": _mean([c["timing_s"].get("inference") for c in evaluated]),
        },
    }
    results = finish_report(results, out_dir)
    log.info("evaluated %s on %d/%d cases of %s", model_name, len(evaluated), len(cases), dataset.name)
    return results


def _progress(dataset: EvaluationDataset, model_name: str, enabled: bool) -> tqdm[Case]:
    return tqdm(dataset.cases, desc=f"evaluate {model_name}", unit="case", disable=not enabled)


def _segmentation_case(
    model: SegmentationModel,
    case: Case,
    dataset: EvaluationDataset,
    default_modality: str,
    out_dir: Path,
    file_name: str,
    overlays: bool,
) -> dict[str, Any]:
    record: dict[str, Any] = {"case": case.name, "status": "ok"}
    timing: dict[str, float] = {}
    start = time.perf_counter()
    try:
        volume, reference = load_segmentation_case(case, dataset, model.segments, default_modality)
        timing["load"] = time.perf_counter() - start
        record.update(_volume_info(volume))
        notes = list(reference.notes)
        if model.accepts_modalities and volume.modality not in model.accepts_modalities:
            notes.append(f"modality {volume.modality} is not one the model accepts")
        t = time.perf_counter()
        label_map = np.asarray(model.segment(volume))
        timing["inference"] = time.perf_counter() - t
        if label_map.shape != volume.shape:
            raise DatasetError(f"model returned shape {label_map.shape} for a {volume.shape} volume")
        t = time.perf_counter()
        voxel_mm3 = voxel_volume_mm3(volume)
        labels = []
        for spec in model.segments:
            ref = reference.masks.get(spec.label_value)
            if ref is None and dataset.config.missing_reference == "skip":
                continue
            pred = label_map == spec.label_value
            ref = np.zeros_like(pred) if ref is None else ref
            labels.append(_label_scores(spec, pred, ref, volume.spacing, voxel_mm3))
        timing["metrics"] = time.perf_counter() - t
        record.update(reference=reference.source, labels=labels, notes=notes)
        if overlays:
            t = time.perf_counter()
            png = out_dir / "overlays" / f"{file_name}.png"
            title = f"{case.name}: " + ", ".join(f"{s['label']} Dice {s['dice']:.3f}" for s in labels)
            plots.overlay_montage(
                volume.array, reference.masks, label_map, model.segments, volume.spacing, title, png
            )
            record["overlay"] = png.relative_to(out_dir).as_posix()
            timing["overlay"] = time.perf_counter() - t
    # Deliberately broad: a model or reader may raise anything (torch RuntimeError, highdicom
    # ValueError...); the case is reported as failed with its error and the other cases still count.
    except Exception as exc:  # noqa: BLE001
        _fail(record, case, exc)
    timing["total"] = time.perf_counter() - start
    record["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
    return record


def _label_scores(
    spec: SegmentSpec,
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: tuple[float, float, float],
    voxel_mm3: float,
) -> dict[str, Any]:
    volumes = metrics.volume_error(pred, ref, voxel_mm3)
    return {
        "label_value": spec.label_value,
        "label": spec.label,
        "dice": metrics.dice(pred, ref),
        "hd95_mm": metrics.hd95(pred, ref, spacing),
        "reference_cm3": volumes.reference_cm3,
        "prediction_cm3": volumes.prediction_cm3,
        "volume_error_cm3": volumes.error_cm3,
        "volume_error_pct": volumes.error_pct,
        "reference_empty": not bool(ref.any()),
        "prediction_empty": not bool(pred.any()),
    }


def _segmentation_summary(segments: list[SegmentSpec], cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summary = []
    for spec in segments:
        scores = [
            s
            for c in cases
            if c["status"] == "ok"
            for s in c["labels"]
            if s["label_value"] == spec.label_value
        ]
        pct = [s["volume_error_pct"] for s in scores]
        summary.append(
            {
                "label_value": spec.label_value,
                "label": spec.label,
                "n_cases": len(scores),
                "n_reference_empty": sum(s["reference_empty"] for s in scores),
                "n_missed": sum(s["prediction_empty"] and not s["reference_empty"] for s in scores),
                "n_false_alarm": sum(s["reference_empty"] and not s["prediction_empty"] for s in scores),
                "dice": metrics.summarise([s["dice"] for s in scores]),
                "hd95_mm": metrics.summarise([s["hd95_mm"] for s in scores]),
                "volume_error_cm3": metrics.summarise([s["volume_error_cm3"] for s in scores]),
                "volume_error_pct": metrics.summarise(pct),
                "abs_volume_error_pct": metrics.summarise([abs(v) if v is not None else None for v in pct]),
            }
        )
    return summary


def _classification_case(
    model: ClassificationModel,
    case: Case,
    dataset: EvaluationDataset,
    default_modality: str,
    matched: dict[str, int],
) -> dict[str, Any]:
    record: dict[str, Any] = {"case": case.name, "status": "ok"}
    timing: dict[str, float] = {}
    start = time.perf_counter()
    try:
        volume = load_classification_volume(case, dataset, default_modality)
        timing["load"] = time.perf_counter() - start
        record.update(_volume_info(volume))
        t = time.perf_counter()
        results = model.classify(volume)
        timing["inference"] = time.perf_counter() - t
        truth_by_index = truth_by_finding(case, matched)
        record["findings"] = [
            {
                "finding": result.spec.finding.meaning,
                "probability": result.probability,
                "predicted": result.present,
                "truth": truth_by_index.get(index),
            }
            for index, result in enumerate(results)
        ]
    except Exception as exc:  # noqa: BLE001  (see _segmentation_case)
        _fail(record, case, exc)
    timing["total"] = time.perf_counter() - start
    record["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
    return record


def _classification_summary(findings: list[FindingSpec], cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summary = []
    for index, spec in enumerate(findings):
        scored = [
            c["findings"][index]
            for c in cases
            if c["status"] == "ok" and c["findings"][index]["truth"] is not None
        ]
        truth = [int(s["truth"]) for s in scored]
        probabilities = [float(s["probability"]) for s in scored]
        counts = metrics.confusion(truth, [bool(s["predicted"]) for s in scored])
        auc = metrics.roc_auc(truth, probabilities)
        roc = metrics.roc_curve(truth, probabilities)
        n_pos, n_neg = sum(truth), len(truth) - sum(truth)
        summary.append(
            {
                "finding": spec.finding.meaning,
                "code": {"value": spec.finding.value, "scheme": spec.finding.scheme_designator},
                "threshold": spec.threshold,
                "n": len(scored),
                "n_positive": n_pos,
                "n_negative": n_neg,
                "tp": counts.tp,
                "fp": counts.fp,
                "tn": counts.tn,
                "fn": counts.fn,
                "accuracy": _rate(counts.accuracy, counts.tp + counts.tn, counts.n),
                "precision": _rate(counts.precision, counts.tp, counts.tp + counts.fp),
                "recall": _rate(counts.recall, counts.tp, counts.tp + counts.fn),
                "specificity": _rate(counts.specificity, counts.tn, counts.tn + counts.fp),
                "f1": counts.f1,
                "auc": {
                    "value": auc,
                    "ci95": list(metrics.auc_interval(auc, n_pos, n_neg)) if auc is not None else None,
                },
                "roc": None
                if roc is None
                else {"fpr": roc.fpr, "tpr": roc.tpr, "thresholds": roc.thresholds},
                "scores": {"probability": probabilities, "truth": truth},
            }
        )
    return summary


def _rate(value: float | None, successes: int, n: int) -> dict[str, Any]:
    interval = metrics.wilson_interval(successes, n)
    return {"value": value, "ci95": list(interval) if interval is not None else None, "k": successes, "n": n}


def _volume_info(volume: Volume) -> dict[str, Any]:
    """What identifies a case's image without patient identity: series UID, modality, grid."""
    return {
        # NIfTI/NRRD volumes carry stand-in headers: their derived series UID would only confuse a reader.
        "series_uid": None if is_image_file(volume.paths[0]) else volume.series_instance_uid,
        "modality": volume.modality,
        "shape": list(volume.shape),
        "spacing_mm": [round(float(s), 4) for s in volume.spacing],
    }


def _fail(record: dict[str, Any], case: Case, exc: Exception) -> None:
    record["status"] = "failed"
    record["error"] = f"{type(exc).__name__}: {exc}"
    log.warning("case %s failed: %s", case.name, record["error"])
    log.debug("case %s traceback", case.name, exc_info=exc)


def _model_info(model: Model, manifest: ModelManifest | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "name": model.identity.name,
        "version": model.identity.version,
        "description": model.identity.description,
        "accepts_modalities": list(model.accepts_modalities),
    }
    if manifest is None:
        return {**info, "manifest": False}
    weights = []
    for w in manifest.weights:
        entry: dict[str, Any] = {"file": w.file, "sha256": w.sha256, "verified": None}
        try:
            path = manifest.weights_path(w)
            entry["verified"] = path.is_file() and sha256_of(path) == w.sha256
        except (OSError, ImportError, ConfigError) as exc:
            entry["problem"] = str(exc)
        weights.append(entry)
    return {
        **info,
        "manifest": True,
        "format": manifest.format,
        "licence": manifest.licence,
        "intended_use": manifest.intended_use,
        "training_data": manifest.training_data,
        "limits": manifest.limits,
        "weights": weights,
    }


def _file_names(case_names: list[str]) -> dict[str, str]:
    """Case name -> a safe, unique file stem for its PNG (case names come from folder names)."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in case_names:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"
        candidate, n = stem, 1
        while candidate.lower() in used:
            n += 1
            candidate = f"{stem}-{n}"
        used.add(candidate.lower())
        out[name] = candidate
    return out


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return round(sum(finite) / len(finite), 3) if finite else None
