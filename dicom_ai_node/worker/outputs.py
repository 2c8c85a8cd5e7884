"""Result objects per destination encoding: which SEG variants the destinations need, and encoding +
storing one SEG + SR pair per variant (the SR references its own SEG, so each variant has its own SR).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom import Dataset, dcmread

from dicom_ai_node.domain.peers import Destination
from dicom_ai_node.domain.results import (
    FindingResult,
    ModelIdentity,
    OutputIdentity,
    RuleIdentity,
    SegmentMeasurement,
    SegmentSpec,
)
from dicom_ai_node.encode.classification_sr import encode_classification_sr
from dicom_ai_node.encode.keyimages import encode_key_images
from dicom_ai_node.encode.seg import SegFormat, encode_seg
from dicom_ai_node.encode.sr import encode_sr
from dicom_ai_node.encode.uids import result_uids
from dicom_ai_node.persistence.repository import ResultKind
from dicom_ai_node.store.spool import RESULTS
from dicom_ai_node.worker.context import StageContext


@dataclass(frozen=True, order=True)
class SegVariant:
    seg_format: SegFormat = "auto"
    omit_empty_frames: bool = True

    @property
    def labelmap(self) -> bool:
        return self.seg_format == "labelmap"

    @property
    def key(self) -> str:
        """'' for the default encoding (its UIDs never change); otherwise part of the result UIDs."""
        if self == DEFAULT_VARIANT:
            return ""
        return self.seg_format + ("" if self.omit_empty_frames else "-all-frames")


DEFAULT_VARIANT = SegVariant()
# What every SEG reader accepts: the default form with a frame per source image and segment.
PLAIN_BINARY = SegVariant("auto", omit_empty_frames=False)


def variant_of(destination: Destination) -> SegVariant:
    return SegVariant(destination.seg_format, destination.seg_omit_empty_frames)


def needed_variants(destinations: Iterable[Destination]) -> list[SegVariant]:
    """Every destination's own variant, plus the plain BINARY fallback for LABELMAP destinations."""
    needed: set[SegVariant] = set()
    for destination in destinations:
        variant = variant_of(destination)
        needed.add(variant)
        if variant.labelmap:
            needed.add(PLAIN_BINARY)
    return sorted(needed)


@dataclass
class StoredResult:
    files: list[str] = field(default_factory=list)
    sop_instance_uids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ResultOrigin:
    """Where one infer job's results come from; the same for every object the job makes."""

    job_id: int
    series_instance_uid: str
    source_datasets: Sequence[Dataset]
    model: ModelIdentity
    rule: RuleIdentity
    identity: OutputIdentity
    # Same series + model version + rule version + revision -> the same UIDs (see encode/uids.py).
    revision: int


@dataclass(frozen=True)
class ResultInputs:
    """Everything one segmentation encoding needs, computed once per job."""

    origin: ResultOrigin
    label_map: np.ndarray
    segments: list[SegmentSpec]
    measurements: Sequence[SegmentMeasurement]
    pixel_values: np.ndarray  # the source volume in modality units, for key images


@dataclass(frozen=True)
class ClassificationInputs:
    origin: ResultOrigin
    findings: Sequence[FindingResult]


def encode_and_store(ctx: StageContext, inputs: ResultInputs, variant: SegVariant) -> StoredResult:
    """Encode SEG + SR in one variant, write them to the spool and record them (idempotent on UID)."""
    o = inputs.origin
    uids = result_uids(o.series_instance_uid, o.model, o.rule, revision=o.revision, variant=variant.key)
    seg = encode_seg(
        source_datasets=o.source_datasets,
        label_map=inputs.label_map,
        segments=inputs.segments,
        model=o.model,
        rule=o.rule,
        identity=o.identity,
        uids=uids,
        omit_empty_frames=variant.omit_empty_frames,
        revision=o.revision,
        seg_format=variant.seg_format,
    )
    sr = encode_sr(
        source_datasets=o.source_datasets,
        seg=seg,
        measurements=inputs.measurements,
        model=o.model,
        rule=o.rule,
        identity=o.identity,
        uids=uids,
        segments=inputs.segments,
        revision=o.revision,
        predecessor=predecessor_sr(ctx, o, variant),
    )
    # No SEG when nothing was found: only the SR, saying so.
    objects: list[tuple[ResultKind, Dataset]] = [("SEG", seg)] if seg is not None else []
    return _store(ctx, o, [*objects, ("SR", sr)])


def encode_and_store_classification(ctx: StageContext, inputs: ClassificationInputs) -> StoredResult:
    """Encode a classifier's findings as one SR (no SEG: there is no region), spool and record it."""
    o = inputs.origin
    sr = encode_classification_sr(
        source_datasets=o.source_datasets,
        findings=inputs.findings,
        model=o.model,
        rule=o.rule,
        identity=o.identity,
        uids=result_uids(o.series_instance_uid, o.model, o.rule, revision=o.revision),
        revision=o.revision,
        predecessor=predecessor_sr(ctx, o),
    )
    return _store(ctx, o, [("SR", sr)])


def store_key_images(ctx: StageContext, inputs: ResultInputs) -> StoredResult:
    """Secondary Capture key images with the overlay burned in (for destinations with key_images)."""
    o = inputs.origin
    key = result_uids(o.series_instance_uid, o.model, o.rule, revision=o.revision)
    images = encode_key_images(
        values=inputs.pixel_values,
        source_datasets=o.source_datasets,
        label_map=inputs.label_map,
        segments=inputs.segments,
        model=o.model,
        identity=o.identity,
        result_key=key.seg_series_instance_uid,
        revision=o.revision,
    )
    return _store(ctx, o, [("SC", ds) for ds in images])


def _store(
    ctx: StageContext, origin: ResultOrigin, objects: Sequence[tuple[ResultKind, Dataset]]
) -> StoredResult:
    """Write result objects to the spool and record them (idempotent on SOP Instance UID).

    An object stored before under the same deterministic UID (the job was retried after a crash, a lost
    lease or a database outage, or re-run by an admin) replaces that file in place: no earlier copy is
    left behind that no row names, and deliveries an earlier attempt queued send the same file.
    """
    stored = StoredResult()
    earlier = {
        r.sop_instance_uid: r.spool_path for r in ctx.repo.results_of_series(origin.series_instance_uid)
    }
    for kind, ds in objects:
        rel = earlier.get(str(ds.SOPInstanceUID))
        written = rel is None or not ctx.spool.path(rel).is_file()
        if rel is not None and not written:
            ctx.spool.replace_dataset(rel, ds)
        else:
            rel = ctx.spool.write_dataset(ds, RESULTS)
        try:
            ctx.repo.add_result(
                job_id=origin.job_id,
                source_series_instance_uid=origin.series_instance_uid,
                kind=kind,
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                study_instance_uid=str(ds.StudyInstanceUID),
                spool_path=rel,
            )
        except BaseException:
            if written:
                # Named by no row (e.g. the database went down): the retry writes it again.
                ctx.spool.remove(rel)
            raise
        stored.files.append(rel)
        stored.sop_instance_uids.append(str(ds.SOPInstanceUID))
    return stored


def predecessor_sr(
    ctx: StageContext, origin: ResultOrigin, variant: SegVariant = DEFAULT_VARIANT
) -> Dataset | None:
    """The newest earlier revision's SR of the same (series, model, rule, variant), if this node made one.

    Found through the deterministic UIDs of the earlier revisions, so no extra bookkeeping is needed.
    """
    series_uid, model, rule = origin.series_instance_uid, origin.model, origin.rule
    stored = {r.sop_instance_uid: r for r in ctx.repo.results_of_series(series_uid) if r.kind == "SR"}
    for earlier in range(origin.revision - 1, 0, -1):
        uid = result_uids(series_uid, model, rule, revision=earlier, variant=variant.key).sr_sop_instance_uid
        row = stored.get(uid)
        if row is not None:
            return dcmread(ctx.spool.path(row.spool_path), stop_before_pixels=True)
    return None
