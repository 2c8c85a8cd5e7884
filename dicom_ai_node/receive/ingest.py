"""One ingest path for both receive edges: a received temp file becomes a spool file plus one DB row.

The C-STORE handler (scp.py) and the STOW-RS endpoint (api/routers/stow.py, through the callable that
`stow_ingest` builds) both end here, so both keep the same durability rule (docs/architecture.md):
temp file in the spool's incoming dir -> fsync -> rename -> fsync dir -> DB commit -> only then "stored".
Duplicates (a SOP Instance UID already stored) are kept once and still reported as a success.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from dicom_ai_node.domain.conformance import (
    ACCEPTED_TRANSFER_SYNTAXES,
    IMAGE_STORAGE_SOP_CLASSES,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_DOES_NOT_MATCH,
    STATUS_INVALID_SOP_INSTANCE,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PIXEL_DATA_TOO_SHORT,
    STATUS_SOP_CLASS_MISMATCH,
    STATUS_SOP_INSTANCE_MISMATCH,
    STATUS_SUCCESS,
    is_valid_uid,
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
from dicom_ai_node.errors import DatabaseError, StorageError
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.persistence.repository import InstanceRecord, SeriesRepository
from dicom_ai_node.receive.header import (
    UID_KEYWORDS,
    UNDEFINED_LENGTH,
    Header,
    UnreadableDataset,
    read_header,
)
from dicom_ai_node.store.spool import Spool

log = logging.getLogger(__name__)

__all__ = [
    "Refused",
    "StoreRequest",
    "calling_label",
    "check_instance",
    "ingest_file",
    "instance_record",
    "stow_failure_reason",
    "stow_ingest",
]


@dataclass(frozen=True)
class StoreRequest:
    """What a C-STORE request announced about the data set it carries.

    Without one (STOW-RS, retrieved files) the file's own File Meta Information is the announcement
    (PS3.10 7.1: Media Storage SOP Class/Instance UID equal the data set's SOP Class/Instance UID).
    """

    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    # The presentation context's abstract syntax: the SOP class the sender negotiated for this data set.
    context_sop_class_uid: str = ""


class _Refused(Exception):
    """A check refused the instance: the status to answer and a one-line reason (UIDs only, no PHI)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# What `check_instance` raises (its status and reason), for callers outside this module.
Refused = _Refused


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
    request: StoreRequest | None = None,
    peer: str = "",
) -> IngestResult:
    """Store one received Part 10 file durably and record it; map every failure to a named DIMSE status.

    Before anything is stored the file must pass the receive checks (`check_instance`), the same for
    C-STORE, STOW-RS and retrieved instances. `sop_classes` / `transfer_syntaxes`: refuse others (None:
    the SCP's presentation contexts already decided). `expected_study`: refuse an instance of another
    study (STOW-RS `/studies/{study}`). `request`: the C-STORE request's announcement. `peer`: who sent
    it, for the log (default `calling`). The temp file is moved into the spool on success and deleted
    otherwise.
    """
    try:
        # Locked until its row is committed or it is removed: the orphan sweep at start
        # (Spool.remove_orphans) then tells a live writer's file from one a killed process left behind.
        with spool.held(tmp_path) as local:
            return _ingest(
                local,
                calling=calling,
                peer=peer or calling,
                spool=spool,
                repo=repo,
                reserve_bytes=reserve_bytes,
                sop_classes=sop_classes,
                transfer_syntaxes=transfer_syntaxes,
                expected_study=expected_study,
                request=request,
            )
    except StorageError as exc:
        announced = request.affected_sop_instance_uid if request is not None else ""
        log.error("cannot spool SOP %s from %s: %s", announced or "?", peer or calling, exc)
        return _failed(STATUS_OUT_OF_RESOURCES, "cannot write to the spool", sop_instance=announced)
    finally:
        # Moved into the spool when stored; anything left is a refused instance (never acknowledged).
        tmp_path.unlink(missing_ok=True)


def _ingest(
    tmp_path: Path,
    *,
    calling: str,
    peer: str,
    spool: Spool,
    repo: SeriesRepository,
    reserve_bytes: int,
    sop_classes: Collection[str] | None,
    transfer_syntaxes: Collection[str] | None,
    expected_study: str | None,
    request: StoreRequest | None,
) -> IngestResult:
    announced = request.affected_sop_instance_uid if request is not None else ""
    if not spool.has_space(reserve_bytes):
        log.error("refusing SOP %s from %s: spool disk under its reserve", announced or "?", peer)
        return _failed(STATUS_OUT_OF_RESOURCES, "spool disk under its reserve", sop_instance=announced)
    try:
        header = read_header(tmp_path)
    except UnreadableDataset as exc:
        log.warning("rejected SOP %s from %s with 0x%04X: %s", announced or "?", peer, exc.status, exc.reason)
        return _failed(exc.status, exc.reason, sop_instance=announced)
    uids = header.uids
    sop_instance, sop_class, study = uids["SOPInstanceUID"], uids["SOPClassUID"], uids["StudyInstanceUID"]
    try:
        check_instance(header, request)
        _check_acceptance(header, sop_classes, transfer_syntaxes, expected_study)
    except _Refused as refused:
        # Name the instance by the UID the sender announced when the data set's own is unusable.
        named = announced or header.media_storage_sop_instance_uid or sop_instance or "?"
        log.warning("rejected SOP %s from %s with 0x%04X: %s", named, peer, refused.status, refused.reason)
        return _failed(refused.status, refused.reason, sop_class, named, study)
    size = tmp_path.stat().st_size
    try:
        spool_path = spool.commit_file(tmp_path)
    except StorageError as exc:
        log.error("cannot spool SOP %s from %s: %s", sop_instance, peer, exc)
        return _failed(STATUS_OUT_OF_RESOURCES, "cannot write to the spool", sop_class, sop_instance, study)
    record = instance_record(header, spool_path, size, calling)
    try:
        is_new = repo.record_instance(record)
    except DatabaseError as exc:
        spool.remove(spool_path)
        log.error("database error storing SOP %s from %s: %s", sop_instance, peer, exc)
        return _failed(STATUS_OUT_OF_RESOURCES, "database unavailable", sop_class, sop_instance, study)
    if not is_new:
        # Duplicates are stored once (as Orthanc does) and still answered Success.
        spool.remove(spool_path)
        log.info("duplicate SOP %s from %s kept once", sop_instance, peer)
    return IngestResult(
        STATUS_SUCCESS,
        sop_class,
        sop_instance,
        "stored" if is_new else "already stored",
        stored=True,
        duplicate=not is_new,
        study_instance_uid=study,
        size_bytes=size,
        series_instance_uid=uids["SeriesInstanceUID"],
    )


def instance_record(header: Header, spool_path: str, size_bytes: int, calling: str) -> InstanceRecord:
    """The database row of a stored instance whose header passed `check_instance` (both receive edges:
    here, and the native edge's landing indexer, receive/landing.py)."""
    uids, attrs = header.uids, header.attrs
    return InstanceRecord(
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        transfer_syntax_uid=header.transfer_syntax_uid,
        spool_path=spool_path,
        size_bytes=size_bytes,
        calling_ae=calling,
        modality=str(attrs.get("Modality", "")),
        body_part_examined=str(attrs.get("BodyPartExamined", "")),
        series_description=str(attrs.get("SeriesDescription", "")),
        header=attrs,
    )


def check_instance(header: Header, request: StoreRequest | None) -> None:
    """The receive checks every edge applies to a data set before storing it; raises _Refused.

    Cheap by design: header values and declared lengths only, no pixel decoding.
    """
    if request is not None:
        announced_class, announced_instance = (
            request.affected_sop_class_uid,
            request.affected_sop_instance_uid,
        )
    else:
        announced_class = header.media_storage_sop_class_uid
        announced_instance = header.media_storage_sop_instance_uid
    if announced_instance and not is_valid_uid(announced_instance):
        raise _Refused(
            STATUS_INVALID_SOP_INSTANCE, "Affected SOP Instance UID is not a valid UID (PS3.5 9.1)"
        )
    for keyword in UID_KEYWORDS:
        value = header.uids[keyword]
        if not value:
            raise _Refused(STATUS_DATASET_DOES_NOT_MATCH, f"missing {keyword}")
        if not is_valid_uid(value):
            raise _Refused(
                STATUS_DATASET_DOES_NOT_MATCH, f"{keyword} is not a valid UID (PS3.5 9.1): {value!r}"
            )
    sop_instance, sop_class = header.uids["SOPInstanceUID"], header.uids["SOPClassUID"]
    if announced_instance and sop_instance != announced_instance:
        raise _Refused(
            STATUS_SOP_INSTANCE_MISMATCH,
            f"data set SOP Instance UID {sop_instance} differs from the announced {announced_instance}",
        )
    context_class = request.context_sop_class_uid if request is not None else ""
    for label, expected in (("announced", announced_class), ("presentation context's", context_class)):
        if expected and sop_class != expected:
            raise _Refused(
                STATUS_SOP_CLASS_MISMATCH,
                f"data set SOP Class UID {sop_class} differs from the {label} {expected}",
            )
    _check_pixel_data(header)


def _positive_int(value: Any, default: int | None = None) -> int | None:
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _check_pixel_data(header: Header) -> None:
    """Refuse Pixel Data shorter than the Image Pixel module says (uncompressed transfer syntaxes only;
    encapsulated frames have no length the header can predict)."""
    pixel = header.pixel_data
    transfer_syntax = UID(header.transfer_syntax_uid)
    # A UID that names no transfer syntax (pydicom raises on is_encapsulated): nothing to predict here; STOW-RS
    # refuses it as an unsupported transfer syntax next, C-STORE never sees one (pynetdicom writes the
    # negotiated one). Found by tests/fuzz/fuzz_receive.py.
    if pixel is None or not transfer_syntax.is_transfer_syntax or transfer_syntax.is_encapsulated:
        return
    if pixel.length == UNDEFINED_LENGTH:
        raise _Refused(STATUS_CANNOT_UNDERSTAND, "Pixel Data of undefined length in a native transfer syntax")
    image, attrs = header.image, header.attrs
    rows, columns = _positive_int(image.get("Rows")), _positive_int(image.get("Columns"))
    samples = _positive_int(image.get("SamplesPerPixel"), 1)
    bits = _positive_int(image.get("BitsAllocated"))
    frames = _positive_int(attrs.get("NumberOfFrames"), 1)
    if rows is None or columns is None or samples is None or bits is None or frames is None:
        return  # cannot say what the length should be; the image fails later with its own reason
    expected = (rows * columns * frames * samples * bits + 7) // 8
    if image.get("PhotometricInterpretation") == "YBR_FULL_422":
        # Native YBR_FULL_422 stores two samples per pixel on average (PS3.3 C.7.6.3.1.2).
        expected = expected // 3 * 2
    if pixel.length < expected:
        raise _Refused(
            STATUS_PIXEL_DATA_TOO_SHORT,
            f"Pixel Data holds {pixel.length} bytes, Rows x Columns x NumberOfFrames x SamplesPerPixel x "
            f"BitsAllocated/8 = {rows} x {columns} x {frames} x {samples} x {bits}/8 needs {expected}",
        )


def _check_acceptance(
    header: Header,
    sop_classes: Collection[str] | None,
    transfer_syntaxes: Collection[str] | None,
    expected_study: str | None,
) -> None:
    sop_class, study = header.uids["SOPClassUID"], header.uids["StudyInstanceUID"]
    transfer_syntax = header.transfer_syntax_uid
    if sop_classes is not None and sop_class not in sop_classes:
        raise _Refused(FAILURE_SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class} is not accepted")
    if transfer_syntaxes is not None and transfer_syntax not in transfer_syntaxes:
        raise _Refused(
            FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED, f"transfer syntax {transfer_syntax or '?'} is not accepted"
        )
    if expected_study is not None and study != expected_study:
        raise _Refused(FAILURE_STUDY_MISMATCH, "Study Instance UID differs from the study of the request URL")


def stow_ingest(
    spool: Spool, repo: SeriesRepository, reserve_bytes: int, metrics: NodeMetrics | None = None
) -> Ingest:
    """The ingest callable the STOW-RS endpoint gets (api.context.AdminContext.ingest).

    Same storage path and receive checks as C-STORE (the File Meta Information stands for the C-STORE
    request), plus the checks the SCP's presentation contexts make for DIMSE (SOP class, transfer syntax)
    and the study of `/studies/{study}`. Failures carry the STOW-RS FailureReason (`stow_failure_reason`).
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
        if not result.ok:
            result = replace(result, status=stow_failure_reason(result.status))
        if metrics is not None and result.stored:
            metrics.instances_received.inc()
            metrics.received_bytes.inc(max(0, result.size_bytes))
        return result

    return ingest


def stow_failure_reason(status: int) -> int:
    """The STOW-RS FailureReason (0008,1197) for a refusal of the receive path (PS3.18 10.5.3 lists the
    family codes only): every "cannot understand" (0xCxxx of C-STORE) is 0xC000, every "data set does not
    match" (0xA9xx, and an invalid announced SOP Instance UID, which for STOW-RS is the part's own File
    Meta Information) is 0xA900; 0xA700, 0x0122 and 0xC122 stay as they are."""
    if status == STATUS_INVALID_SOP_INSTANCE or 0xA900 <= status <= 0xA9FF:
        return FAILURE_STUDY_MISMATCH
    if 0xC000 <= status <= 0xCFFF and status != FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED:
        return FAILURE_CANNOT_UNDERSTAND
    return status
