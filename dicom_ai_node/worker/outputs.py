"""Result objects per destination encoding: which SEG variants the destinations need, and encoding +
storing one SEG + SR pair per variant (the SR references its own SEG, so each variant has its own SR).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from pydicom import Dataset, dcmread

from dicom_ai_node.config import Destination
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

if TYPE_CHECKING:
    from dicom_ai_node.worker.stages import StageContext


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
class ResultInputs:
    """Everything one encoding needs, computed once per job."""

    job_id: int
    series_instance_uid: str
    source_datasets: Sequence[Dataset]
    label_map: np.ndarray
    model: ModelIdentity
    segments: list[SegmentSpec]
    rule: RuleIdentity
    identity: OutputIdentity
    revision: int
    measurements: Sequence[SegmentMeasurement]
    pixel_values: np.ndarray  # the source volume in modality units, for key images


@dataclass(frozen=True)
class ClassificationInputs:
    job_id: int
    series_instance_uid: str
    source_datasets: Sequence[Dataset]
    findings: Sequence[FindingResult]
    model: ModelIdentity
    rule: RuleIdentity
    identity: OutputIdentity
    revision: int


def encode_and_store(ctx: StageContext, inputs: ResultInputs, variant: SegVariant) -> StoredResult:
    """Encode SEG + SR in one variant, write them to the spool and record them (idempotent on UID)."""
    uids = result_uids(
        inputs.series_instance_uid,
        inputs.model,
        inputs.rule,
        revision=inputs.revision,
        variant=variant.key,
    )
    seg = encode_seg(
        inputs.source_datasets,
        inputs.label_map,
        inputs.segments,
        inputs.model,
        inputs.rule,
        inputs.identity,
        uids,
        omit_empty_frames=variant.omit_empty_frames,
        revision=inputs.revision,
        seg_format=variant.seg_format,
    )
    sr = encode_sr(
        inputs.source_datasets,
        seg,
        inputs.measurements,
        inputs.model,
        inputs.rule,
        inputs.identity,
        uids,
        segments=inputs.segments,
        revision=inputs.revision,
        predecessor=predecessor_sr(
            ctx, inputs.series_instance_uid, inputs.model, inputs.rule, inputs.revision, variant
        ),
    )
    # No SEG when nothing was found: only the SR, saying so.
    objects: list[tuple[ResultKind, Dataset]] = [("SEG", seg)] if seg is not None else []
    return _store(ctx, inputs.job_id, inputs.series_instance_uid, [*objects, ("SR", sr)])


def encode_and_store_classification(ctx: StageContext, inputs: ClassificationInputs) -> StoredResult:
    """Encode a classifier's findings as one SR (no SEG: there is no region), spool and record it."""
    uids = result_uids(inputs.series_instance_uid, inputs.model, inputs.rule, revision=inputs.revision)
    sr = encode_classification_sr(
        inputs.source_datasets,
        inputs.findings,
        inputs.model,
        inputs.rule,
        inputs.identity,
        uids,
        revision=inputs.revision,
        predecessor=predecessor_sr(
            ctx, inputs.series_instance_uid, inputs.model, inputs.rule, inputs.revision
        ),
    )
    return _store(ctx, inputs.job_id, inputs.series_instance_uid, [("SR", sr)])


def store_key_images(ctx: StageContext, inputs: ResultInputs) -> StoredResult:
    """Secondary Capture key images with the overlay burned in (for destinations with key_images)."""
    key = result_uids(inputs.series_instance_uid, inputs.model, inputs.rule, revision=inputs.revision)
    images = encode_key_images(
        inputs.pixel_values,
        inputs.source_datasets,
        inputs.label_map,
        inputs.segments,
        inputs.model,
        inputs.identity,
        result_key=key.seg_series_instance_uid,
        revision=inputs.revision,
    )
    return _store(ctx, inputs.job_id, inputs.series_instance_uid, [("SC", ds) for ds in images])


def _store(
    ctx: StageContext, job_id: int, series_uid: str, objects: Sequence[tuple[ResultKind, Dataset]]
) -> StoredResult:
    """Write result objects to the spool and record them (idempotent on SOP Instance UID)."""
    stored = StoredResult()
    for kind, ds in objects:
        rel = ctx.spool.write_dataset(ds, RESULTS)
        ctx.repo.add_result(
            job_id=job_id,
            source_series_instance_uid=series_uid,
            kind=kind,
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            spool_path=rel,
        )
        stored.files.append(rel)
        stored.sop_instance_uids.append(str(ds.SOPInstanceUID))
    return stored


def predecessor_sr(
    ctx: StageContext,
    series_uid: str,
    model: ModelIdentity,
    rule: RuleIdentity,
    revision: int,
    variant: SegVariant = DEFAULT_VARIANT,
) -> Dataset | None:
    """The newest earlier revision's SR of the same (series, model, rule, variant), if this node made one.

    Found through the deterministic UIDs of the earlier revisions, so no extra bookkeeping is needed.
    """
    stored = {r.sop_instance_uid: r for r in ctx.repo.results_of_series(series_uid) if r.kind == "SR"}
    for earlier in range(revision - 1, 0, -1):
        uid = result_uids(series_uid, model, rule, revision=earlier, variant=variant.key).sr_sop_instance_uid
        row = stored.get(uid)
        if row is not None:
            return dcmread(ctx.spool.path(row.spool_path), stop_before_pixels=True)
    return None
