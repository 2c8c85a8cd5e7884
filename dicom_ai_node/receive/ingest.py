"""One ingest path for both receive edges: a received temp file becomes a spool file plus one DB row.

The C-STORE handler (scp.py) and the STOW-RS endpoint (api/routers/stow.py, through the callable that
`stow_ingest` builds) both end here, so both keep the same durability rule (docs/architecture.md):
temp file in the spool's incoming dir -> fsync -> rename -> fsync dir -> DB commit -> only then "stored".
Duplicates (a SOP Instance UID already stored) are kept once and still reported as a success.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

from dicom_ai_node.domain.conformance import (
    ACCEPTED_TRANSFER_SYNTAXES,
    IMAGE_STORAGE_SOP_CLASSES,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_DOES_NOT_MATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
)
from dicom_ai_node.domain.ingest import (
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_SOP_CLASS_NOT_SUPPORTED,
    FAILURE_STUDY_MISMATCH,
    FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED,
    Ingest,
    IngestResult,
    calling_label,
)
from dicom_ai_node.errors import DatabaseError, InvalidDicomError, StorageError
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.persistence.repository import InstanceRecord, SeriesRepository
from dicom_ai_node.receive.header import read_header
from dicom_ai_node.store.spool import Spool

log = logging.getLogger(__name__)

__all__ = ["calling_label", "ingest_file", "stow_ingest"]


def _failed(
    status: int, reason: str, sop_class: str = "", sop_instance: str = "", study: str = ""
) -> IngestResult:
    return IngestResult(status, sop_class, sop_instance, reason, stored=False, study_instance_uid=study)


def ingest_file(
    tmp_path: Path,
    *,
    calling: str,
    spool: Spool,
    repo: SeriesRepository,
    reserve_bytes: int,
    sop_classes: Collection[str] | None = None,
    transfer_syntaxes: Collection[str] | None = None,
    expected_study: str | None = None,
    announced_sop_instance: str = "",
) -> IngestResult:
    """Store one received Part 10 file durably and record it; map every failure to a named DIMSE status.

    `sop_classes` / `transfer_syntaxes`: refuse others (None: the SCP's presentation contexts already
    decided). `expected_study`: refuse an instance of another study (STOW-RS `/studies/{study}`).
    `announced_sop_instance`: the C-STORE command's Affected SOP Instance UID, for the log only.
    The temp file is moved into the spool on success and deleted otherwise.
    """
    try:
        return _ingest(
            tmp_path,
            calling=calling,
            spool=spool,
            repo=repo,
            reserve_bytes=reserve_bytes,
            sop_classes=sop_classes,
            transfer_syntaxes=transfer_syntaxes,
            expected_study=expected_study,
            announced=announced_sop_instance,
        )
    finally:
        # Moved into the spool when stored; anything left is a refused instance (never acknowledged).
        tmp_path.unlink(missing_ok=True)


def _ingest(
    tmp_path: Path,
    *,
    calling: str,
    spool: Spool,
    repo: SeriesRepository,
    reserve_bytes: int,
    sop_classes: Collection[str] | None,
    transfer_syntaxes: Collection[str] | None,
    expected_study: str | None,
    announced: str,
) -> IngestResult:
    if not spool.has_space(reserve_bytes):
        log.error("refusing SOP %s from %s: spool disk under its reserve", announced or "?", calling)
        return _failed(STATUS_OUT_OF_RESOURCES, "spool disk under its reserve", sop_instance=announced)
    try:
        uids, attrs, transfer_syntax = read_header(tmp_path)
    except InvalidDicomError as exc:
        status = STATUS_DATASET_DOES_NOT_MATCH if str(exc).startswith("missing") else STATUS_CANNOT_UNDERSTAND
        log.warning("rejected SOP %s from %s with 0x%04X: %s", announced or "?", calling, status, exc)
        return _failed(status, str(exc), sop_instance=announced)
    sop_instance, sop_class, study = uids["SOPInstanceUID"], uids["SOPClassUID"], uids["StudyInstanceUID"]
    if announced and sop_instance != announced:
        log.warning(
            "SOP %s from %s: dataset says SOPInstanceUID %s; storing under the dataset's",
            announced,
            calling,
            sop_instance,
        )
    refusal = _refusal(sop_class, transfer_syntax, study, sop_classes, transfer_syntaxes, expected_study)
    if refusal is not None:
        status, reason = refusal
        log.warning("rejected SOP %s from %s with 0x%04X: %s", sop_instance, calling, status, reason)
        return _failed(status, reason, sop_class, sop_instance, study)
    size = tmp_path.stat().st_size
    try:
        spool_path = spool.commit_file(tmp_path)
    except StorageError as exc:
        log.error("cannot spool SOP %s from %s: %s", sop_instance, calling, exc)
        return _failed(STATUS_OUT_OF_RESOURCES, "cannot write to the spool", sop_class, sop_instance, study)
    record = InstanceRecord(
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        series_instance_uid=uids["SeriesInstanceUID"],
        study_instance_uid=study,
        transfer_syntax_uid=transfer_syntax,
        spool_path=spool_path,
        size_bytes=size,
        calling_ae=calling,
        modality=str(attrs.get("Modality", "")),
        body_part_examined=str(attrs.get("BodyPartExamined", "")),
        series_description=str(attrs.get("SeriesDescription", "")),
        header=attrs,
    )
    try:
        is_new = repo.record_instance(record)
    except DatabaseError as exc:
        spool.remove(spool_path)
        log.error("database error storing SOP %s from %s: %s", sop_instance, calling, exc)
        return _failed(STATUS_OUT_OF_RESOURCES, "database unavailable", sop_class, sop_instance, study)
    if not is_new:
        # Duplicates are stored once (as Orthanc does) and still answered Success.
        spool.remove(spool_path)
        log.info("duplicate SOP %s from %s kept once", sop_instance, calling)
    return IngestResult(
        STATUS_SUCCESS,
        sop_class,
        sop_instance,
        "stored" if is_new else "already stored",
        stored=True,
        duplicate=not is_new,
        study_instance_uid=study,
        size_bytes=size,
    )


def _refusal(
    sop_class: str,
    transfer_syntax: str,
    study: str,
    sop_classes: Collection[str] | None,
    transfer_syntaxes: Collection[str] | None,
    expected_study: str | None,
) -> tuple[int, str] | None:
    if sop_classes is not None and sop_class not in sop_classes:
        return FAILURE_SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class} is not accepted"
    if transfer_syntaxes is not None and transfer_syntax not in transfer_syntaxes:
        return (
            FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED,
            f"transfer syntax {transfer_syntax or '?'} is not accepted",
        )
    if expected_study is not None and study != expected_study:
        return FAILURE_STUDY_MISMATCH, "Study Instance UID differs from the study of the request URL"
    return None


def stow_ingest(
    spool: Spool, repo: SeriesRepository, reserve_bytes: int, metrics: NodeMetrics | None = None
) -> Ingest:
    """The ingest callable the STOW-RS endpoint gets (api.context.AdminContext.ingest).

    Same storage path as C-STORE, plus the checks the SCP's presentation contexts make for DIMSE (SOP
    class, transfer syntax), the study of `/studies/{study}`, and the STOW-RS code for an unreadable part
    (0xC000 where C-STORE answers 0xC210; both are PS3.4 "cannot understand").
    """
    sop_classes = frozenset(str(uid) for uid in IMAGE_STORAGE_SOP_CLASSES)
    transfer_syntaxes = frozenset(str(uid) for uid in ACCEPTED_TRANSFER_SYNTAXES)

    def ingest(tmp_path: Path, calling: str, expected_study: str | None) -> IngestResult:
        result = ingest_file(
            tmp_path,
            calling=calling,
            spool=spool,
            repo=repo,
            reserve_bytes=reserve_bytes,
            sop_classes=sop_classes,
            transfer_syntaxes=transfer_syntaxes,
            expected_study=expected_study,
        )
        if result.status == STATUS_CANNOT_UNDERSTAND:
            result = replace(result, status=FAILURE_CANNOT_UNDERSTAND)
        if metrics is not None and result.stored:
            metrics.instances_received.inc()
            metrics.received_bytes.inc(max(0, result.size_bytes))
        return result

    return ingest
