"""The two job kinds, each composed from the stages in one readable function.

infer:   load series -> volume -> model (in the inference host, under a hard timeout)
         -> segmentation: SEG + SR (TID 1500 volumes); classification: SR (findings + probability)
         -> spool + results rows (deterministic UIDs) -> one `deliver` job per destination
deliver: spool files -> C-STORE SCU -> done (transient failures retry with backoff; permanent go dead)

Delivery is its own job so a PACS outage re-runs only the sending, never the inference.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy.exc import SQLAlchemyError

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.deliver.dimse import StoreReport
from dicom_ai_node.deliver.registry import Deliverer, deliverer_for
from dicom_ai_node.domain.jobs import JobKind
from dicom_ai_node.domain.results import RuleIdentity
from dicom_ai_node.encode.measure import measure
from dicom_ai_node.errors import InferenceError, PermanentDeliveryError, TransientDeliveryError
from dicom_ai_node.infer.host import InferenceHost
from dicom_ai_node.infer.volume import load_series, voxel_volume_mm3
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.persistence.queue import Job, JobQueue
from dicom_ai_node.persistence.repository import SeriesRepository, SeriesStatus
from dicom_ai_node.store.spool import Spool
from dicom_ai_node.worker.outputs import (
    PLAIN_BINARY,
    ClassificationInputs,
    ResultInputs,
    encode_and_store,
    encode_and_store_classification,
    needed_variants,
    store_key_images,
    variant_of,
)

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    settings: NodeSettings
    repo: SeriesRepository
    queue: JobQueue
    spool: Spool
    inference: InferenceHost
    software_version: str
    metrics: NodeMetrics | None = None


def run_infer(job: Job, ctx: StageContext) -> dict[str, Any]:
    p = job.payload
    series_uid: str = p["series_instance_uid"]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    instances = ctx.repo.instances_of_series(series_uid)
    if not instances:
        row = ctx.repo.get_series(series_uid)
        if row is not None and row.status == SeriesStatus.PURGED:
            raise InferenceError(
                f"series {series_uid}: {row.route_note}; send the series again to process it"
            )
        raise InferenceError(f"series {series_uid} has no stored instances")
    volume = load_series([ctx.spool.path(i.spool_path) for i in instances])
    timings["load_s"] = time.perf_counter() - t0
    _observe_stage(ctx, "load", p["model"], timings["load_s"])

    t = time.perf_counter()
    # The model runs in the inference host's child process (warm between jobs, killed at the timeout).
    result = ctx.inference.run(p["model"], volume)
    timings["infer_s"] = time.perf_counter() - t
    _observe_stage(ctx, "infer", p["model"], timings["infer_s"])

    t = time.perf_counter()
    # Same series + model version + rule version + generation -> the same UIDs: a re-run job replaces
    # its objects in the PACS instead of adding a second result series. A late instance re-opens the
    # series as a new generation: its results are a new revision with new UIDs, and the SR names the
    # one it supersedes (never a silent overwrite).
    rule = RuleIdentity(p["rule_id"], int(p["rule_version"]))
    identity = ctx.settings.identity.output_identity(ctx.software_version)
    revision = int(p.get("generation", 1))
    destinations = [ctx.settings.destination(name) for name in p["destinations"]]
    deliveries: dict[str, tuple[list[str], list[str]]] = {}
    summary: dict[str, Any]
    if result.task == "classification":
        assert result.findings is not None
        stored_sr = encode_and_store_classification(
            ctx,
            ClassificationInputs(
                job.id,
                series_uid,
                volume.datasets,
                result.findings,
                result.identity,
                rule,
                identity,
                revision,
            ),
        )
        sop_uids = stored_sr.sop_instance_uids
        # One SR serves every destination: SEG encodings and key images do not apply.
        deliveries = {d.name: (stored_sr.files, []) for d in destinations}
        summary = {"findings": {f.spec.finding.meaning: round(f.probability, 4) for f in result.findings}}
        found_text = ", ".join(
            f"{f.spec.finding.meaning} {f.probability:.3f}{' present' if f.present else ''}"
            for f in result.findings
        )
    else:
        label_map = result.label_map
        if label_map is None or label_map.shape != volume.array.shape:
            got = None if label_map is None else label_map.shape
            raise InferenceError(f"model {p['model']} returned shape {got}, expected {volume.shape}")
        inputs = ResultInputs(
            job_id=job.id,
            series_instance_uid=series_uid,
            source_datasets=volume.datasets,
            label_map=label_map,
            model=result.identity,
            segments=result.segments,
            rule=rule,
            identity=identity,
            revision=revision,
            measurements=measure(label_map, result.segments, voxel_volume_mm3(volume)),
            pixel_values=volume.array,
        )
        stored = {
            variant: encode_and_store(ctx, inputs, variant) for variant in needed_variants(destinations)
        }
        key_images = store_key_images(ctx, inputs).files if any(d.key_images for d in destinations) else []
        for destination in destinations:
            variant = variant_of(destination)
            extra = key_images if destination.key_images else []
            # A PACS that refuses the LABELMAP SEG gets the plain BINARY one instead.
            fallback = stored[PLAIN_BINARY].files + extra if variant.labelmap else []
            deliveries[destination.name] = (stored[variant].files + extra, fallback)
        sop_uids = [uid for r in stored.values() for uid in r.sop_instance_uids]
        volumes = {m.label: round(m.volume_cm3, 2) for m in inputs.measurements if m.voxel_count}
        summary = {"volumes_cm3": volumes}
        found_text = str(volumes or "nothing found")
    timings["encode_s"] = time.perf_counter() - t
    _observe_stage(ctx, "encode", p["model"], timings["encode_s"])

    for name, (files, fallback_files) in deliveries.items():
        ctx.queue.enqueue(
            JobKind.DELIVER,
            {
                "destination": name,
                "files": files,
                "fallback_files": fallback_files,
                "series_instance_uid": series_uid,
                "infer_job_id": job.id,
                # Carried along so the admin page can filter deliveries by rule and model too.
                "rule_id": rule.rule_id,
                "model": p["model"],
            },
            dedupe_key=f"deliver:{series_uid}:{name}:job{job.id}:a{job.attempts}",
            priority=job.priority,
            max_attempts=ctx.settings.worker.max_attempts,
        )
    timings["total_s"] = time.perf_counter() - t0
    log.info(
        "infer job %d: series %s model %s %s on %s -> %s (%s)",
        job.id,
        series_uid,
        result.identity.name,
        result.identity.version,
        result.device,
        found_text,
        ", ".join(f"{k} {v:.2f}" for k, v in timings.items()),
    )
    return {
        "model": result.identity.name,
        "model_version": result.identity.version,
        "task": result.task,
        "device": result.device,
        "rule_id": rule.rule_id,
        "rule_version": rule.rule_version,
        "sop_instance_uids": sop_uids,
        **summary,
        "timings": timings,
    }


def run_deliver(job: Job, ctx: StageContext) -> dict[str, Any]:
    """Send the result files, then (destination.verify) read back that the destination holds them all.

    A read-back that misses an object is transient: the job is retried and re-sends the same UIDs.
    """
    dest = ctx.settings.destination(job.payload["destination"])
    deliverer = deliverer_for(dest, ctx.settings.ae_title)
    paths: list[Path] = [ctx.spool.path(rel) for rel in job.payload["files"]]
    gone = [p for p in paths if not p.is_file()]
    if gone:
        raise PermanentDeliveryError(
            f"{len(gone)} of {len(paths)} result files are no longer in the spool (retention removes them "
            "with their series' images): send the series again to make new results"
        )
    t0 = time.perf_counter()
    try:
        report, paths, fallback = _send(job, ctx, deliverer, dest.name, paths)
        elapsed = time.perf_counter() - t0
        verified = _verify(deliverer, dest.name, paths) if dest.verify else False
    except Exception:
        # Every failed attempt counts, whatever the error; the worker decides retry or dead letter.
        if ctx.metrics is not None:
            ctx.metrics.observe_delivery(dest.name, time.perf_counter() - t0, ok=False)
        raise
    if ctx.metrics is not None:
        ctx.metrics.observe_delivery(dest.name, time.perf_counter() - t0, ok=True)
        _observe_receive_to_delivered(ctx.metrics, ctx.repo, job.payload.get("series_instance_uid"))
    log.info(
        "deliver job %d: %d objects to %s in %.2f s%s",
        job.id,
        len(report.sent),
        dest.name,
        elapsed,
        ", verified" if verified else "",
    )
    return {
        "destination": dest.name,
        "sent": report.sent,
        "warnings": report.warnings,
        "send_s": elapsed,
        "verified": verified,
        "fallback": fallback,
    }


def _send(
    job: Job, ctx: StageContext, deliverer: Deliverer, destination: str, paths: list[Path]
) -> tuple[StoreReport, list[Path], bool]:
    """Send the files -> (report, the paths sent, whether the plain BINARY fallback was sent)."""
    try:
        return deliverer.send(paths), paths, False
    except PermanentDeliveryError as exc:
        if not job.payload.get("fallback_files"):
            raise
        # The PACS refused the opt-in encoding (unknown SOP class or transfer syntax): send the plain
        # BINARY SEG (and its SR) that every SEG reader accepts.
        log.warning(
            "deliver job %d: %s refused the LABELMAP SEG (%s); sending plain BINARY", job.id, destination, exc
        )
        paths = [ctx.spool.path(rel) for rel in job.payload["fallback_files"]]
        return deliverer.send(paths), paths, True


def _verify(deliverer: Deliverer, destination: str, paths: list[Path]) -> bool:
    """Read back that the destination holds every object sent; a missing one is transient (re-sent)."""
    headers = [dcmread(p, stop_before_pixels=True, specific_tags=_UID_TAGS) for p in paths]
    expected: dict[tuple[str, str], set[str]] = {}
    for ds in headers:
        key = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        expected.setdefault(key, set()).add(str(ds.SOPInstanceUID))
    for (study_uid, series_uid), sop_uids in expected.items():
        missing = sop_uids - deliverer.held(study_uid, series_uid)
        if missing:
            raise TransientDeliveryError(
                f"read-back: {destination} does not hold {len(missing)} of the {len(sop_uids)} objects "
                f"sent in series {series_uid}"
            )
    return True


def _observe_stage(ctx: StageContext, stage: str, model: str, seconds: float) -> None:
    if ctx.metrics is not None:
        ctx.metrics.observe_stage(stage, model, seconds)


def _observe_receive_to_delivered(
    metrics: NodeMetrics, repo: SeriesRepository, series_instance_uid: str | None
) -> None:
    """Series last received -> now (results delivered); a metrics read must never fail the delivery."""
    if not series_instance_uid:
        return
    try:
        row = repo.get_series(series_instance_uid)
    except SQLAlchemyError as exc:
        log.warning("metrics: series %s not read for receive-to-delivered: %s", series_instance_uid, exc)
        return
    if row is not None:
        metrics.observe_receive_to_delivered((datetime.now(UTC) - row.last_received_at).total_seconds())


_UID_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
