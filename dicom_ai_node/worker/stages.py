"""The two job kinds, each composed from the stages in one readable function.

infer:   load series -> volume -> model -> SEG + SR (deterministic UIDs) -> spool + results rows
         -> one `deliver` job per destination
deliver: spool files -> C-STORE SCU -> done (transient failures retry with backoff; permanent go dead)

Delivery is its own job so a PACS outage re-runs only the sending, never the inference.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.deliver.registry import deliverer_for
from dicom_ai_node.domain.jobs import JobKind
from dicom_ai_node.domain.results import RuleIdentity
from dicom_ai_node.encode.measure import measure
from dicom_ai_node.errors import InferenceError, PermanentDeliveryError, TransientDeliveryError
from dicom_ai_node.infer.registry import ModelRegistry
from dicom_ai_node.infer.volume import load_series, voxel_volume_mm3
from dicom_ai_node.persistence.queue import Job, JobQueue
from dicom_ai_node.persistence.repository import SeriesRepository
from dicom_ai_node.store.spool import Spool
from dicom_ai_node.worker.outputs import (
    PLAIN_BINARY,
    ResultInputs,
    encode_and_store,
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
    registry: ModelRegistry
    software_version: str


def run_infer(job: Job, ctx: StageContext) -> dict[str, Any]:
    p = job.payload
    series_uid: str = p["series_instance_uid"]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    instances = ctx.repo.instances_of_series(series_uid)
    if not instances:
        raise InferenceError(f"series {series_uid} has no stored instances")
    volume = load_series([ctx.spool.path(i.spool_path) for i in instances])
    timings["load_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    model = ctx.registry.get(p["model"])
    label_map = model.segment(volume)
    timings["infer_s"] = time.perf_counter() - t
    if label_map.shape != volume.array.shape:
        raise InferenceError(f"model {p['model']} returned shape {label_map.shape}, expected {volume.shape}")

    t = time.perf_counter()
    # Same series + model version + rule version + generation -> the same UIDs: a re-run job replaces
    # its objects in the PACS instead of adding a second result series. A late instance re-opens the
    # series as a new generation: its results are a new revision with new UIDs, and the SR names the
    # one it supersedes (never a silent overwrite).
    inputs = ResultInputs(
        job_id=job.id,
        series_instance_uid=series_uid,
        source_datasets=volume.datasets,
        label_map=label_map,
        model=model,
        rule=RuleIdentity(p["rule_id"], int(p["rule_version"])),
        identity=ctx.settings.identity.output_identity(ctx.software_version),
        revision=int(p.get("generation", 1)),
        measurements=measure(label_map, model.segments, voxel_volume_mm3(volume)),
        pixel_values=volume.array,
    )
    destinations = [ctx.settings.destination(name) for name in p["destinations"]]
    stored = {variant: encode_and_store(ctx, inputs, variant) for variant in needed_variants(destinations)}
    key_images = store_key_images(ctx, inputs).files if any(d.key_images for d in destinations) else []
    timings["encode_s"] = time.perf_counter() - t

    for destination in destinations:
        variant = variant_of(destination)
        extra = key_images if destination.key_images else []
        files = stored[variant].files + extra
        ctx.queue.enqueue(
            JobKind.DELIVER,
            {
                "destination": destination.name,
                "files": files,
                # A PACS that refuses the LABELMAP SEG gets the plain BINARY one instead.
                "fallback_files": stored[PLAIN_BINARY].files + extra if variant.labelmap else [],
                "series_instance_uid": series_uid,
                "infer_job_id": job.id,
            },
            dedupe_key=f"deliver:{series_uid}:{destination.name}:job{job.id}:a{job.attempts}",
            priority=job.priority,
            max_attempts=ctx.settings.worker.max_attempts,
        )
    timings["total_s"] = time.perf_counter() - t0
    found = {m.label: round(m.volume_cm3, 2) for m in inputs.measurements if m.voxel_count}
    log.info(
        "infer job %d: series %s model %s -> %s (%s)",
        job.id,
        series_uid,
        model.identity.name,
        found or "nothing found",
        ", ".join(f"{k} {v:.2f}" for k, v in timings.items()),
    )
    return {
        "model": model.identity.name,
        "model_version": model.identity.version,
        "rule_id": inputs.rule.rule_id,
        "rule_version": inputs.rule.rule_version,
        "sop_instance_uids": [uid for result in stored.values() for uid in result.sop_instance_uids],
        "volumes_cm3": found,
        "timings": timings,
    }


def run_deliver(job: Job, ctx: StageContext) -> dict[str, Any]:
    """Send the result files, then (destination.verify) read back that the destination holds them all.

    A read-back that misses an object is transient: the job is retried and re-sends the same UIDs.
    """
    dest = ctx.settings.destination(job.payload["destination"])
    deliverer = deliverer_for(dest, ctx.settings.ae_title)
    paths: list[Path] = [ctx.spool.path(rel) for rel in job.payload["files"]]
    t0 = time.perf_counter()
    fallback = False
    try:
        report = deliverer.send(paths)
    except PermanentDeliveryError as exc:
        if not job.payload.get("fallback_files"):
            raise
        # The PACS refused the opt-in encoding (unknown SOP class or transfer syntax): send the plain
        # BINARY SEG (and its SR) that every SEG reader accepts.
        log.warning(
            "deliver job %d: %s refused the LABELMAP SEG (%s); sending plain BINARY", job.id, dest.name, exc
        )
        paths = [ctx.spool.path(rel) for rel in job.payload["fallback_files"]]
        report = deliverer.send(paths)
        fallback = True
    elapsed = time.perf_counter() - t0
    verified = False
    if dest.verify:
        headers = [dcmread(p, stop_before_pixels=True, specific_tags=_UID_TAGS) for p in paths]
        expected: dict[tuple[str, str], set[str]] = {}
        for ds in headers:
            key = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
            expected.setdefault(key, set()).add(str(ds.SOPInstanceUID))
        for (study_uid, series_uid), sop_uids in expected.items():
            missing = sop_uids - deliverer.held(study_uid, series_uid)
            if missing:
                raise TransientDeliveryError(
                    f"read-back: {dest.name} does not hold {len(missing)} of the {len(sop_uids)} objects "
                    f"sent in series {series_uid}"
                )
        verified = True
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


_UID_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
