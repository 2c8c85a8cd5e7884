"""The DICOM edge: a pynetdicom SCP for C-ECHO and C-STORE that only persists.

One handler per event, dependencies passed as handler args (pynetdicom's `evt_handlers` style). The
C-STORE handler writes nothing but the spool file and one DB row, then answers: no pixel decoding, no
routing, no inference, no network on the association thread (DESIGN.md, "Data flows one way").
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from sqlalchemy.exc import SQLAlchemyError

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.dimse_socket import set_tcp_nodelay
from dicom_ai_node.errors import InvalidDicomError, StorageError
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.persistence.repository import InstanceRecord, SeriesRepository
from dicom_ai_node.receive.allowlist import PeerAllowList
from dicom_ai_node.receive.conformance import (
    ACCEPTED_TRANSFER_SYNTAXES,
    IMAGE_STORAGE_SOP_CLASSES,
    REJECT_CALLING_AE,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_DOES_NOT_MATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    VERIFICATION_SOP_CLASS,
)
from dicom_ai_node.receive.header import read_header
from dicom_ai_node.store.spool import Spool

log = logging.getLogger(__name__)

# What pynetdicom answers when a C-STORE handler raises: counted as the peer sees it.
_STATUS_HANDLER_RAISED = 0xC211


@dataclass
class StoreContext:
    spool: Spool
    repo: SeriesRepository
    reserve_bytes: int
    metrics: NodeMetrics | None = None


def handle_requested(event: Event, allow_list: PeerAllowList) -> None:
    """Reject associations from calling AEs (or addresses) that are not on the allow-list."""
    requestor = event.assoc.requestor
    primitive = requestor.primitive
    calling_ae = str(primitive.calling_ae_title).strip() if primitive is not None else ""

    if not allow_list.is_allowed(calling_ae, requestor.address):
        log.warning(
            "association rejected: calling AE %r from %s is not allowed", calling_ae, requestor.address
        )
        event.assoc.acse.send_reject(*REJECT_CALLING_AE)
        # As pynetdicom's own reject path does: kill() lets the DUL flush the A-ASSOCIATE-RJ first.
        event.assoc.kill()


def handle_echo(event: Event) -> int:
    return STATUS_SUCCESS


def handle_store(event: Event, ctx: StoreContext) -> int:
    """Persist one instance durably, then answer; map every failure to a named DIMSE status."""
    try:
        status, size = _store(event, ctx)
    except Exception:
        if ctx.metrics is not None:
            ctx.metrics.observe_store(_STATUS_HANDLER_RAISED, 0)
        raise
    if ctx.metrics is not None:
        ctx.metrics.observe_store(status, size)
    return status


def _store(event: Event, ctx: StoreContext) -> tuple[int, int]:
    """(DIMSE status, bytes of the instance when answered Success else 0)."""
    calling_ae = str(event.assoc.requestor.ae_title).strip()
    sop_instance_uid = str(getattr(event.request, "AffectedSOPInstanceUID", ""))
    if not ctx.spool.has_space(ctx.reserve_bytes):
        log.error("refusing SOP %s from %s: spool disk under its reserve", sop_instance_uid, calling_ae)
        return STATUS_OUT_OF_RESOURCES, 0
    tmp_path = Path(event.dataset_path)
    try:
        uids, attrs, transfer_syntax = read_header(tmp_path)
    except InvalidDicomError as exc:
        status = STATUS_DATASET_DOES_NOT_MATCH if str(exc).startswith("missing") else STATUS_CANNOT_UNDERSTAND
        log.warning("rejected SOP %s from %s with 0x%04X: %s", sop_instance_uid, calling_ae, status, exc)
        return status, 0
    if uids["SOPInstanceUID"] != sop_instance_uid:
        log.warning(
            "SOP %s from %s: dataset says SOPInstanceUID %s; storing under the dataset's",
            sop_instance_uid,
            calling_ae,
            uids["SOPInstanceUID"],
        )
    size = tmp_path.stat().st_size
    try:
        spool_path = ctx.spool.commit_file(tmp_path)
    except StorageError as exc:
        log.error("cannot spool SOP %s from %s: %s", sop_instance_uid, calling_ae, exc)
        return STATUS_OUT_OF_RESOURCES, 0
    record = InstanceRecord(
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        transfer_syntax_uid=transfer_syntax,
        spool_path=spool_path,
        size_bytes=size,
        calling_ae=calling_ae,
        modality=str(attrs.get("Modality", "")),
        body_part_examined=str(attrs.get("BodyPartExamined", "")),
        series_description=str(attrs.get("SeriesDescription", "")),
        header=attrs,
    )
    try:
        is_new = ctx.repo.record_instance(record)
    except SQLAlchemyError as exc:
        ctx.spool.remove(spool_path)
        log.error(
            "database error storing SOP %s from %s: %s", sop_instance_uid, calling_ae, type(exc).__name__
        )
        return STATUS_OUT_OF_RESOURCES, 0
    if not is_new:
        # Duplicates are stored once (as Orthanc does) and still answered Success.
        ctx.spool.remove(spool_path)
        log.info("duplicate SOP %s from %s kept once", sop_instance_uid, calling_ae)
    return STATUS_SUCCESS, size


def build_storage_ae(settings: NodeSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.dicom.max_pdu
    ae.acse_timeout = settings.dicom.acse_timeout_s
    ae.dimse_timeout = settings.dicom.dimse_timeout_s
    ae.network_timeout = settings.dicom.network_timeout_s
    ae.maximum_associations = 32
    ae.add_supported_context(VERIFICATION_SOP_CLASS)
    for sop_class in IMAGE_STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
    return ae


class StorageSCP:
    """The running SCP; `start()` returns at once (pynetdicom serves in its own threads)."""

    def __init__(
        self,
        settings: NodeSettings,
        spool: Spool,
        repo: SeriesRepository,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.ctx = StoreContext(spool, repo, settings.disk_reserve_mb * 1024 * 1024, metrics)
        self.allow_list = PeerAllowList(settings.dicom.allowed_peers, settings.dicom.allow_any_peer)
        self.ae = build_storage_ae(settings)
        self._server: Any = None

    def start(self) -> None:
        # Chunked receive streams each dataset to a temp file instead of memory; putting that temp file
        # in the spool makes the final move an atomic same-filesystem rename.
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(self.ctx.spool.incoming)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_REQUESTED, handle_requested, [self.allow_list]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.ctx]),
        ]
        address = (self.settings.dicom.bind, self.settings.dicom.port)
        self._server = self.ae.start_server(address, block=False, evt_handlers=handlers)
        log.info("DICOM SCP %s listening on %s:%d", self.settings.ae_title, *address)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
