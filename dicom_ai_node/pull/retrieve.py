"""Retrieve series from a PACS source into the spool + DB: C-MOVE, C-GET (PS3.4 C.4.2 / C.4.3) or WADO-RS.

Every retrieved instance takes the receive edge's persist path (receive.ingest.ingest_file), so it is
stored once (duplicates are kept once and leave a routed series alone) and routed by the completion sweep
like any received series. C-MOVE asks the PACS to C-STORE into the node's own running SCP: the instances
arrive there by themselves, and the caller waits until the database holds them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from pydicom import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.presentation import build_context, build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_ai_node.domain.conformance import (
    ACCEPTED_TRANSFER_SYNTAXES,
    IMAGE_STORAGE_SOP_CLASSES,
    STATUS_OUT_OF_RESOURCES,
)
from dicom_ai_node.errors import PermanentPullError, StorageError, TransientPullError
from dicom_ai_node.persistence.repository import SeriesRepository
from dicom_ai_node.pull._dimse import PENDING, QrPeer, associate, check_final
from dicom_ai_node.receive.ingest import ingest_file
from dicom_ai_node.store.spool import Spool

log = logging.getLogger(__name__)

STUDY_ROOT_MOVE = StudyRootQueryRetrieveInformationModelMove
STUDY_ROOT_GET = StudyRootQueryRetrieveInformationModelGet
# C-GET storage sub-operations: uncompressed first, so a PACS that transcodes picks a syntax every
# reader decodes; the compressed ones still let it send compressed instances as they are stored.
GET_TRANSFER_SYNTAXES: list[str | UID] = list(
    dict.fromkeys([ExplicitVRLittleEndian, ImplicitVRLittleEndian, *ACCEPTED_TRANSFER_SYNTAXES])
)
_IMAGE_SOP_CLASSES = frozenset(str(uid) for uid in IMAGE_STORAGE_SOP_CLASSES)


@dataclass
class Counts:
    """What one retrieve did: instances stored new, already stored (duplicates), refused, failed."""

    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    failed: int = 0  # sub-operations the PACS reports failed (C-MOVE / C-GET)

    @property
    def received(self) -> int:
        return self.stored + self.duplicates


@dataclass
class Receiver:
    """Ingests retrieved files with the receive edge's persist path; `calling` fills the calling_ae column
    (the PACS's AE title, as when the PACS sends by itself)."""

    spool: Spool
    repo: SeriesRepository
    reserve_bytes: int
    calling: str
    counts: Counts = field(default_factory=Counts)
    on_instance: Callable[[], None] | None = None

    def ingest(self, tmp_path: Path) -> int:
        result = ingest_file(
            tmp_path,
            calling=self.calling,
            spool=self.spool,
            repo=self.repo,
            reserve_bytes=self.reserve_bytes,
            sop_classes=_IMAGE_SOP_CLASSES,
        )
        if result.duplicate:
            self.counts.duplicates += 1
        elif result.stored:
            self.counts.stored += 1
        else:
            self.counts.refused += 1
        if self.on_instance is not None:
            self.on_instance()
        return result.status

    def ingest_dataset(self, ds: Dataset) -> int:
        staged = self.spool.incoming / f"{uuid.uuid4().hex}.part"
        try:
            ds.save_as(staged, enforce_file_format=True)
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise StorageError(
                f"cannot write a retrieved instance to the spool: {exc.strerror or exc}"
            ) from exc
        return self.ingest(staged)


def _identifier(study_instance_uid: str, series_instance_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    return ds


def _suboperations(status: Dataset) -> tuple[int | None, int, int, int]:
    """(remaining, completed, failed, warning) sub-operations of a C-MOVE / C-GET response."""
    remaining = status.get("NumberOfRemainingSuboperations")
    return (
        int(remaining) if remaining is not None else None,
        int(status.get("NumberOfCompletedSuboperations") or 0),
        int(status.get("NumberOfFailedSuboperations") or 0),
        int(status.get("NumberOfWarningSuboperations") or 0),
    )


SubopProgress = Callable[[int, int | None], None]  # (done in this series, total in this series or None)


def _run_retrieve(
    responses: Any, peer: QrPeer, operation: str, series_instance_uid: str, progress: SubopProgress
) -> tuple[int, int]:
    """Drive one C-MOVE / C-GET to its final status -> (completed + warning, failed) sub-operations."""
    done = failed = 0
    for status, _ in responses:
        if not status:
            raise TransientPullError(f"no {operation} response from {peer.label} (timeout or abort)")
        code = int(status.Status)
        remaining, completed, failed, warning = _suboperations(status)
        done = completed + warning
        if code in PENDING:
            progress(done, done + failed + remaining if remaining is not None else None)
            continue
        check_final(peer, operation, code)
        if code != 0x0000:
            log.warning(
                "%s of series %s from %s: 0x%04X, %d sub-operations failed",
                operation,
                series_instance_uid,
                peer.label,
                code,
                failed,
            )
    return done, failed


def c_move_series(
    peer: QrPeer,
    move_destination: str,
    study_instance_uid: str,
    series_instance_uid: str,
    progress: SubopProgress,
) -> tuple[int, int]:
    """Ask the PACS to C-STORE one series to `move_destination` (the node's AE) -> (stored, failed)."""
    assoc = associate(peer, [build_context(STUDY_ROOT_MOVE)])
    try:
        responses = assoc.send_c_move(
            _identifier(study_instance_uid, series_instance_uid), move_destination, STUDY_ROOT_MOVE
        )
        return _run_retrieve(responses, peer, "C-MOVE", series_instance_uid, progress)
    finally:
        if assoc.is_established:
            assoc.release()


def _handle_get_store(event: Event, receiver: Receiver) -> int:
    """EVT_C_STORE on the C-GET association: the sub-operations arrive on it, one instance each."""
    try:
        chunked = event.dataset_path  # set when a running SCP in this process turned chunked receive on
    except AttributeError:
        chunked = None
    if chunked is not None:
        tmp = Path(chunked)
    else:
        tmp = receiver.spool.incoming / f"{uuid.uuid4().hex}.part"
        try:
            tmp.write_bytes(event.encoded_dataset())
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.error("C-GET: cannot write an instance to the spool: %s", exc.strerror or exc)
            return STATUS_OUT_OF_RESOURCES
    return receiver.ingest(tmp)


def c_get_series(
    peer: QrPeer,
    study_instance_uid: str,
    series_instance_uid: str,
    receiver: Receiver,
    progress: SubopProgress,
) -> tuple[int, int]:
    """C-GET one series; its instances come back on the same association and are ingested as they
    arrive -> (stored, failed) sub-operations as the PACS counts them."""
    contexts = [build_context(STUDY_ROOT_GET)]
    contexts += [build_context(uid, GET_TRANSFER_SYNTAXES) for uid in IMAGE_STORAGE_SOP_CLASSES]
    # SCP/SCU role selection (PS3.7 D.3.3.4): we are the Storage SCP on this association.
    roles = [build_role(uid, scp_role=True) for uid in IMAGE_STORAGE_SOP_CLASSES]
    assoc = associate(
        peer, contexts, ext_neg=roles, handlers=[(evt.EVT_C_STORE, _handle_get_store, [receiver])]
    )
    try:
        responses = assoc.send_c_get(_identifier(study_instance_uid, series_instance_uid), STUDY_ROOT_GET)
        return _run_retrieve(responses, peer, "C-GET", series_instance_uid, progress)
    finally:
        if assoc.is_established:
            assoc.release()


def wado_series(
    client: Any, source_name: str, study_instance_uid: str, series_instance_uid: str, receiver: Receiver
) -> int:
    """WADO-RS retrieve one series, ingesting each instance as it streams in -> instances received."""
    before = receiver.counts.received + receiver.counts.refused
    try:
        for ds in client.iter_series(study_instance_uid, series_instance_uid):
            receiver.ingest_dataset(ds)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        message = f"WADO-RS from {source_name} answered HTTP {status}"
        if 400 <= status < 500 and status not in (408, 429):
            raise PermanentPullError(message) from exc
        raise TransientPullError(message) from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise TransientPullError(f"cannot reach {source_name}: {type(exc).__name__}") from exc
    return receiver.counts.received + receiver.counts.refused - before
