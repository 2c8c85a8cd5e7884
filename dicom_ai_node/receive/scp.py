"""The DICOM edge: a pynetdicom SCP for C-ECHO and C-STORE that only persists.

One handler per event, dependencies passed as handler args (pynetdicom's `evt_handlers` style). The
C-STORE handler writes nothing but the spool file and one DB row, then answers: no pixel decoding, no
routing, no inference, no network on the association thread (DESIGN.md, "Data flows one way").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.events import Event

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.dimse_socket import set_tcp_nodelay
from dicom_ai_node.domain.conformance import (
    ACCEPTED_TRANSFER_SYNTAXES,
    IMAGE_STORAGE_SOP_CLASSES,
    REJECT_CALLING_AE,
    STATUS_SUCCESS,
    VERIFICATION_SOP_CLASS,
)
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.persistence.repository import SeriesRepository
from dicom_ai_node.receive.allowlist import PeerAllowList
from dicom_ai_node.receive.chunked import receive_into
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
    """Reject associations from calling AEs (or addresses) that are not on the allow-list.

    Fails closed: EVT_REQUESTED is a notification event, and pynetdicom logs and swallows what its
    handlers raise, so an error here must itself reject, never return. Behind it, pynetdicom's own
    `require_calling_aet` (set in `build_storage_ae`) refuses unknown AE titles even if this handler
    cannot run at all; this handler adds the per-AE address check.
    """
    assoc = event.assoc
    try:
        requestor = assoc.requestor
        primitive = requestor.primitive
        calling_ae = str(primitive.calling_ae_title).strip() if primitive is not None else ""
        if allow_list.is_allowed(calling_ae, requestor.address):
            return
        log.warning(
            "association rejected: calling AE %r from %s is not allowed", calling_ae, requestor.address
        )
    except Exception:  # noqa: BLE001 - any failure of the check is a refusal (fail closed)
        log.exception("association rejected: the allow-list check failed")
    try:
        assoc.acse.send_reject(*REJECT_CALLING_AE)
    finally:
        # As pynetdicom's own reject path does: kill() lets the DUL flush the A-ASSOCIATE-RJ first. Killed,
        # the association never exchanges a DIMSE message, even if sending the reject failed.
        assoc.kill()


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


def build_storage_ae(settings: NodeSettings, allow_list: PeerAllowList | None = None) -> AE:
    ae = AE(ae_title=settings.ae_title)
    if allow_list is not None and not allow_list.allow_any:
        # pynetdicom enforces this in its own negotiation (A-ASSOCIATE-RJ 1/1/3), no handler involved. An
        # empty list would mean "anyone" to pynetdicom; an empty allow-list admits no one, which
        # handle_requested enforces.
        ae.require_calling_aet = allow_list.ae_titles
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
        self.ae = build_storage_ae(settings, self.allow_list)
        self._server: Any = None

    def start(self) -> None:
        # Chunked receive streams each dataset to a temp file instead of memory; putting that temp file
        # in this spool's incoming dir (only for this AE: receive/chunked.py) makes the final move an
        # atomic same-filesystem rename.
        _config.STORE_RECV_CHUNKED_DATASET = True
        receive_into(self.ae, self.ctx.spool.incoming)
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
