"""The job kinds' stages, each composed in one readable function.

infer:   load series -> volume -> model (in the inference host, under a hard timeout)
         -> segmentation: SEG + SR (TID 1500 volumes); classification: SR (findings + probability)
         -> spool + results rows (deterministic UIDs) -> one `deliver` job per destination
deliver: spool files -> C-STORE SCU | STOW-RS | folder -> done (transient failures retry with backoff;
         permanent go dead)

Delivery is its own job so a PACS outage re-runs only the sending, never the inference. Each stage takes
its job's payload already parsed into its kind's model (domain/payloads.py, parsed by the worker).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicom_ai_node.deliver.dimse import StoreReport
from dicom_ai_node.deliver.registry import Deliverer, deliverer_for
from dicom_ai_node.domain.jobs import JobKind
from dicom_ai_node.domain.payloads import DeliverPayload, InferPayload
from dicom_ai_node.domain.peers import Destination
from dicom_ai_node.domain.results import RuleIdentity
from dicom_ai_node.encode.measure import measure
from dicom_ai_node.errors import (
    DatabaseError,
    InferenceError,
    PermanentDeliveryError,
    QueryNotSupportedError,
    TransientDeliveryError,
)
from dicom_ai_node.infer.redact import scrub_exception
from dicom_ai_node.infer.runner import InferenceResult
from dicom_ai_node.infer.volume import Volume, load_series, voxel_volume_mm3
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.persistence.queue import Job
from dicom_ai_node.persistence.repository import SeriesRepository, SeriesStatus
from dicom_ai_node.worker.audit import audit_delivered
from dicom_ai_node.worker.context import StageContext
from dicom_ai_node.worker.outputs import (
    PLAIN_BINARY,
    ClassificationInputs,
    ResultInputs,
    ResultOrigin,
    encode_and_store,
    encode_and_store_classification,
    needed_variants,
    store_key_images,
    variant_of,
)

__all__ = ["StageContext", "run_deliver", "run_infer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferOutputs:
    """What one inference made: the files for each destination, and what to record and log."""

    # destination name -> (files to send, plain BINARY fallback files for a LABELMAP destination)
    deliveries: dict[str, tuple[list[str], list[str]]]
    sop_instance_uids: list[str]
    summary: dict[str, Any]  # merged into the job's result: volumes or findings
    found: str  # for the log line


def run_infer(job: Job, payload: InferPayload, ctx: StageContext) -> dict[str, Any]:
    """Load the series, run the rule's model, encode and store what it found, enqueue the deliveries."""
    series_uid = payload.series_instance_uid
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    volume = _load_volume(ctx, series_uid)
    timings["load_s"] = time.perf_counter() - t0
    _observe_stage(ctx, "load", payload.model, timings["load_s"])

    t = time.perf_counter()
    # The model runs in the inference host's child process (warm between jobs, killed at the timeout),
    # on the voxels in shared memory (a 600-slice CT: 629 MB, held once); encoding reads them where it
    # needs pixels.
    volume = ctx.inference.share(volume)
    result = _run_model(ctx, payload.model, volume)
    timings["infer_s"] = time.perf_counter() - t
    _observe_stage(ctx, "infer", payload.model, timings["infer_s"])

    t = time.perf_counter()
    # Same series + model version + rule version + generation -> the same UIDs: a re-run job replaces
    # its objects in the PACS instead of adding a second result series. A late instance re-opens the
    # series as a new generation: its results are a new revision with new UIDs, and the SR names the
    # one it supersedes (never a silent overwrite).
    origin = ResultOrigin(
        job_id=job.id,
        series_instance_uid=series_uid,
        source_datasets=volume.datasets,
        model=result.identity,
        rule=RuleIdentity(payload.rule_id, payload.rule_version),
        identity=ctx.settings.identity.output_identity(ctx.software_version),
        revision=payload.generation,
    )
    destinations = [ctx.settings.destination(name) for name in payload.destinations]
    if result.task == "classification":
        outputs = _classification_outputs(ctx, origin, result, destinations)
    else:
        outputs = _segmentation_outputs(ctx, origin, volume, result, destinations)
    timings["encode_s"] = time.perf_counter() - t
    _observe_stage(ctx, "encode", payload.model, timings["encode_s"])

    _enqueue_deliveries(ctx, job, payload, outputs)
    timings["total_s"] = time.perf_counter() - t0
    log.info(
        "infer job %d: series %s model %s %s on %s -> %s (%s)",
        job.id,
        series_uid,
        result.identity.name,
        result.identity.version,
        result.device,
        outputs.found,
        ", ".join(f"{k} {v:.2f}" for k, v in timings.items()),
    )
    return {
        "model": result.identity.name,
        "model_version": result.identity.version,
        "task": result.task,
        "device": result.device,
        "rule_id": origin.rule.rule_id,
        "rule_version": origin.rule.rule_version,
        "sop_instance_uids": outputs.sop_instance_uids,
        **outputs.summary,
        "timings": timings,
    }


def _load_volume(ctx: StageContext, series_uid: str) -> Volume:
    instances = ctx.repo.instances_of_series(series_uid)
    if not instances:
        row = ctx.repo.get_series(series_uid)
        if row is not None and row.status == SeriesStatus.PURGED:
            raise InferenceError(
                f"series {series_uid}: {row.route_note}; send the series again to process it"
            )
        raise InferenceError(f"series {series_uid} has no stored instances")
    # Decoded straight into shared memory for the inference process: the worker holds no copy of its own.
    return load_series([ctx.spool.path(i.spool_path) for i in instances], ctx.inference.volume_array)


def _run_model(ctx: StageContext, model: str, volume: Volume) -> InferenceResult:
    """The model on the volume. A model is user code and may quote the header it read in its error:
    the series' patient values are cut out before the error becomes the job's, a log line or the page's."""
    try:
        return ctx.inference.run(model, volume)
    except Exception as exc:
        scrub_exception(exc, volume.datasets[0] if volume.datasets else None)
        raise


def _segmentation_outputs(
    ctx: StageContext,
    origin: ResultOrigin,
    volume: Volume,
    result: InferenceResult,
    destinations: Sequence[Destination],
) -> InferOutputs:
    """SEG + SR (TID 1500 volumes) in each SEG variant the destinations need, plus key images where
    asked; a LABELMAP destination also gets the plain BINARY pair as its fallback."""
    label_map = result.label_map
    if label_map is None or label_map.shape != volume.array.shape:
        got = None if label_map is None else label_map.shape
        raise InferenceError(f"model {origin.model.name} returned shape {got}, expected {volume.shape}")
    inputs = ResultInputs(
        origin=origin,
        label_map=label_map,
        segments=result.segments,
        measurements=measure(label_map, result.segments, voxel_volume_mm3(volume)),
        pixel_values=volume.array,
    )
    stored = {variant: encode_and_store(ctx, inputs, variant) for variant in needed_variants(destinations)}
    key_images = store_key_images(ctx, inputs).files if any(d.key_images for d in destinations) else []
    deliveries: dict[str, tuple[list[str], list[str]]] = {}
    for destination in destinations:
        variant = variant_of(destination)
        extra = key_images if destination.key_images else []
        # A PACS that refuses the LABELMAP SEG gets the plain BINARY one instead.
        fallback = stored[PLAIN_BINARY].files + extra if variant.labelmap else []
        deliveries[destination.name] = (stored[variant].files + extra, fallback)
    volumes = {m.label: round(m.volume_cm3, 2) for m in inputs.measurements if m.voxel_count}
    return InferOutputs(
        deliveries=deliveries,
        sop_instance_uids=[uid for r in stored.values() for uid in r.sop_instance_uids],
        summary={"volumes_cm3": volumes},
        found=str(volumes or "nothing found"),
    )


def _classification_outputs(
    ctx: StageContext, origin: ResultOrigin, result: InferenceResult, destinations: Sequence[Destination]
) -> InferOutputs:
    """One SR of findings with their probabilities, the same for every destination."""
    if result.findings is None:
        raise InferenceError(f"classification model {origin.model.name} returned no findings")
    stored_sr = encode_and_store_classification(ctx, ClassificationInputs(origin, result.findings))
    found = ", ".join(
        f"{f.spec.finding.meaning} {f.probability:.3f}{' present' if f.present else ''}"
        for f in result.findings
    )
    return InferOutputs(
        # SEG encodings and key images do not apply.
        deliveries={d.name: (stored_sr.files, []) for d in destinations},
        sop_instance_uids=stored_sr.sop_instance_uids,
        summary={"findings": {f.spec.finding.meaning: round(f.probability, 4) for f in result.findings}},
        found=found,
    )


def _enqueue_deliveries(ctx: StageContext, job: Job, payload: InferPayload, outputs: InferOutputs) -> None:
    for name, (files, fallback_files) in outputs.deliveries.items():
        ctx.queue.enqueue(
            JobKind.DELIVER,
            DeliverPayload(
                destination=name,
                files=files,
                fallback_files=fallback_files,
                series_instance_uid=payload.series_instance_uid,
                infer_job_id=job.id,
                # Carried along so the admin page can filter deliveries by rule and model too.
                rule_id=payload.rule_id,
                model=payload.model,
            ),
            dedupe_key=f"deliver:{payload.series_instance_uid}:{name}:job{job.id}:a{job.attempts}",
            priority=job.priority,
            max_attempts=ctx.settings.worker.max_attempts,
        )


def run_deliver(job: Job, payload: DeliverPayload, ctx: StageContext) -> dict[str, Any]:
    """Send the result files, then (destination.verify) read back that the destination holds them all.

    A read-back that misses an object is transient: the job is retried and re-sends the same UIDs. A
    destination that stored everything but offers no query (C-FIND / QIDO-RS refused) is "delivered,
    not verified": the job succeeds with `verified: false` and the reason in `verify_error`, and the
    admin decides whether to turn verification off for it.
    """
    dest = ctx.settings.destination(payload.destination)
    deliverer = deliverer_for(dest, ctx.settings.ae_title)
    paths: list[Path] = [ctx.spool.path(rel) for rel in payload.files]
    gone = [p for p in paths if not p.is_file()]
    if gone:
        raise PermanentDeliveryError(
            f"{len(gone)} of {len(paths)} result files are no longer in the spool (retention removes them "
            "with their series' images): send the series again to make new results"
        )
    t0 = time.perf_counter()
    try:
        report, paths, fallback = _send(job, payload, ctx, deliverer, paths)
        elapsed = time.perf_counter() - t0
        verified, verify_error = _verify(deliverer, dest.name, paths) if dest.verify else (False, None)
    except Exception:
        # Every failed attempt counts, whatever the error; the worker decides retry or dead letter.
        if ctx.metrics is not None:
            ctx.metrics.observe_delivery(dest.name, time.perf_counter() - t0, ok=False)
        raise
    if ctx.metrics is not None:
        ctx.metrics.observe_delivery(dest.name, time.perf_counter() - t0, ok=True)
        if verify_error is not None:
            ctx.metrics.observe_unverified(dest.name)
        _observe_receive_to_delivered(ctx.metrics, ctx.repo, payload.series_instance_uid)
    log.log(
        logging.WARNING if verify_error else logging.INFO,
        "deliver job %d: %d objects to %s in %.2f s%s",
        job.id,
        len(report.sent),
        dest.name,
        elapsed,
        ", verified" if verified else (f", not verified: {verify_error}" if verify_error else ""),
    )
    result: dict[str, Any] = {
        "destination": dest.name,
        "sent": report.sent,
        "warnings": report.warnings,
        "send_s": elapsed,
        "verified": verified,
        "fallback": fallback,
    }
    if verify_error is not None:
        result["verify_error"] = verify_error
    if ctx.audit is not None:
        audit_delivered(ctx.audit, job, dest, ctx.settings.ae_title, paths, result)
    return result


def _send(
    job: Job, payload: DeliverPayload, ctx: StageContext, deliverer: Deliverer, paths: list[Path]
) -> tuple[StoreReport, list[Path], bool]:
    """Send the files -> (report, the paths sent, whether the plain BINARY fallback was sent)."""
    try:
        return deliverer.send(paths), paths, False
    except PermanentDeliveryError as exc:
        if not payload.fallback_files:
            raise
        # The PACS refused the opt-in encoding (unknown SOP class or transfer syntax): send the plain
        # BINARY SEG (and its SR) that every SEG reader accepts.
        log.warning(
            "deliver job %d: %s refused the LABELMAP SEG (%s); sending plain BINARY",
            job.id,
            payload.destination,
            exc,
        )
        paths = [ctx.spool.path(rel) for rel in payload.fallback_files]
        return deliverer.send(paths), paths, True


def _verify(deliverer: Deliverer, destination: str, paths: list[Path]) -> tuple[bool, str | None]:
    """Read back that the destination holds every object sent -> (verified, why not).

    A missing object is transient (re-sent); a destination without a query service gives
    (False, the reason): the send succeeded and sending again would not make it answer.
    """
    headers = [dcmread(p, stop_before_pixels=True, specific_tags=_UID_TAGS) for p in paths]
    expected: dict[tuple[str, str], set[str]] = {}
    for ds in headers:
        key = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        expected.setdefault(key, set()).add(str(ds.SOPInstanceUID))
    for (study_uid, series_uid), sop_uids in expected.items():
        try:
            held = deliverer.held(study_uid, series_uid)
        except QueryNotSupportedError as exc:
            return False, f"{destination} offers no query to read back with ({exc})"
        missing = sop_uids - held
        if missing:
            raise TransientDeliveryError(
                f"read-back: {destination} does not hold {len(missing)} of the {len(sop_uids)} objects "
                f"sent in series {series_uid}"
            )
    return True, None


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
    except DatabaseError as exc:
        log.warning("metrics: series %s not read for receive-to-delivered: %s", series_instance_uid, exc)
        return
    if row is not None:
        metrics.observe_receive_to_delivered((datetime.now(UTC) - row.last_received_at).total_seconds())


_UID_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
