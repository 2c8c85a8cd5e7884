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

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.dimse_socket import set_tcp_nodelay
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.persistence.repository import SeriesRepository
from dicom_ai_node.receive.allowlist import PeerAllowList
from dicom_ai_node.receive.conformance import (
    ACCEPTED_TRANSFER_SYNTAXES,
    IMAGE_STORAGE_SOP_CLASSES,
    REJECT_CALLING_AE,
    STATUS_SUCCESS,
    VERIFICATION_SOP_CLASS,
)
from dicom_ai_node.receive.ingest import ingest_file
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
    result = ingest_file(
        Path(event.dataset_path),
        calling=str(event.assoc.requestor.ae_title).strip(),
        spool=ctx.spool,
        repo=ctx.repo,
        reserve_bytes=ctx.reserve_bytes,
        announced_sop_instance=str(getattr(event.request, "AffectedSOPInstanceUID", "")),
    )
    return result.status, result.size_bytes


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
