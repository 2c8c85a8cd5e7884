"""The DICOM edge: a pynetdicom SCP for C-ECHO and C-STORE that only persists.

One handler per event, dependencies passed as handler args (pynetdicom's `evt_handlers` style). The
C-STORE handler writes nothing but the spool file and one DB row, then answers: no pixel decoding, no
routing, no inference, no network on the association thread (DESIGN.md, "Data flows one way").
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.events import Event

from dicom_ai_node.config import DicomSettings, DicomTlsSettings, NodeSettings
from dicom_ai_node.dimse_socket import server_tls_context, set_tcp_nodelay
from dicom_ai_node.domain.conformance import (
    ACCEPTED_TRANSFER_SYNTAXES,
    IMAGE_STORAGE_SOP_CLASSES,
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    STATUS_SUCCESS,
    VERIFICATION_SOP_CLASS,
)
from dicom_ai_node.domain.ingest import IngestResult
from dicom_ai_node.errors import ConfigError
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.persistence.audit import AuditLog
from dicom_ai_node.persistence.repository import SeriesRepository
from dicom_ai_node.receive.allowlist import PeerAllowList
from dicom_ai_node.receive.audit import SecurityAlerts, TransferAudit
from dicom_ai_node.receive.chunked import receive_into
from dicom_ai_node.receive.guard import ConnectionGuard, ConnectionLimits
from dicom_ai_node.receive.ingest import StoreRequest, ingest_file
from dicom_ai_node.receive.release import ReleaseSignals, signalling_titles
from dicom_ai_node.receive.server import NodeAssociationServer, _wake_acceptor
from dicom_ai_node.receive.tls import peer_certificate
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
    # One audit event per association (receive/audit.py); None: not audited.
    transfers: TransferAudit | None = None
    # Series complete on A-RELEASE from peers with `series_complete_on_release` (receive/release.py).
    release: ReleaseSignals | None = None


def handle_requested(
    event: Event,
    allow_list: PeerAllowList,
    called_ae_title: str | None = None,
    alerts: SecurityAlerts | None = None,
) -> None:
    """Reject associations called to another AE title than `called_ae_title` (None: any called AE, the
    `dicom.accept_any_called_ae` setting), and from calling AEs (or addresses) not on the allow-list.

    Fails closed: EVT_REQUESTED is a notification event, and pynetdicom logs and swallows what its
    handlers raise, so an error here must itself reject, never return. Behind it, pynetdicom's own
    `require_calling_aet` (set in `build_storage_ae`) refuses unknown AE titles even if this handler
    cannot run at all; this handler adds the per-AE address check. Each refusal is noted in `alerts`
    (a coalesced "security.alert" audit event, PS3.15 A.5.3.11).
    """
    assoc = event.assoc
    reject = REJECT_CALLING_AE
    address, calling_ae, called_ae, why = "", "", "", "allow-list check failed"
    try:
        requestor = assoc.requestor
        address = str(requestor.address)
        primitive = requestor.primitive
        calling_ae = str(primitive.calling_ae_title).strip() if primitive is not None else ""
        called_ae = str(primitive.called_ae_title).strip() if primitive is not None else ""
        certificate = peer_certificate(assoc)
        if called_ae_title is not None and called_ae != called_ae_title:
            reject = REJECT_CALLED_AE
            why = "called AE title is not this node's"
            log.warning(
                "association rejected: called AE %r is not this node's %r (calling AE %r from %s)",
                called_ae,
                called_ae_title,
                calling_ae,
                requestor.address,
            )
        elif allow_list.is_allowed(calling_ae, requestor.address, certificate):
            return
        else:
            why = "calling AE not allowed" + (" with this TLS client certificate" if certificate else "")
            log.warning(
                "association rejected: calling AE %r from %s is not allowed%s",
                calling_ae,
                requestor.address,
                " with this TLS client certificate" if certificate is not None else "",
            )
    except Exception:  # noqa: BLE001 - any failure of the check is a refusal (fail closed)
        log.exception("association rejected: the allow-list check failed")
    try:
        assoc.acse.send_reject(*reject)
    finally:
        # As pynetdicom's own reject path does: kill() lets the DUL flush the A-ASSOCIATE-RJ first. Killed,
        # the association never exchanges a DIMSE message, even if sending the reject failed.
        assoc.kill()
        if alerts is not None:
            alerts.note(address, calling_ae, called_ae, why)


def handle_echo(event: Event) -> int:
    return STATUS_SUCCESS


def handle_store(event: Event, ctx: StoreContext) -> int:
    """Persist one instance durably, then answer; map every failure to a named DIMSE status."""
    try:
        result = _store(event, ctx)
    except Exception:
        if ctx.metrics is not None:
            ctx.metrics.observe_store(_STATUS_HANDLER_RAISED, 0)
        if ctx.transfers is not None:
            ctx.transfers.stored(event.assoc, IngestResult(_STATUS_HANDLER_RAISED, "", "", "", stored=False))
        raise
    if ctx.metrics is not None:
        ctx.metrics.observe_store(result.status, result.size_bytes)
    if ctx.transfers is not None:
        ctx.transfers.stored(event.assoc, result)
    if ctx.release is not None:
        ctx.release.stored(event.assoc, str(event.assoc.requestor.ae_title).strip(), result)
    return result.status


def handle_release_signal(event: Event, signals: ReleaseSignals) -> None:
    """EVT_RELEASED (after the A-RELEASE-RP went out): the association's series are complete."""
    signals.released(event.assoc)


def handle_abort_signal(event: Event, signals: ReleaseSignals) -> None:
    """EVT_ABORTED: an aborted association signals nothing; its series wait for their quiet period."""
    signals.dropped(event.assoc)


def handle_association_end(event: Event, transfers: TransferAudit, ending: str) -> None:
    """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE: write the association's transfer event once."""
    assoc = event.assoc
    if ending == "closed":
        # The DUL thread closes the connection as soon as an A-ABORT arrives (or after the A-RELEASE-RP
        # is sent), possibly before the association thread reports it: ask the association.
        if assoc.is_released:
            ending = "released"
        elif assoc.is_aborted or assoc.acse.is_aborted():
            ending = "aborted"
    transfers.finish(assoc, ending)


def _store(event: Event, ctx: StoreContext) -> IngestResult:
    """The ingest result: its DIMSE status, and the instance's bytes when answered Success."""
    requestor = event.assoc.requestor
    calling = str(requestor.ae_title).strip()
    request = StoreRequest(
        affected_sop_class_uid=str(getattr(event.request, "AffectedSOPClassUID", None) or ""),
        affected_sop_instance_uid=str(getattr(event.request, "AffectedSOPInstanceUID", None) or ""),
        context_sop_class_uid=str(event.context.abstract_syntax or ""),
    )
    result = ingest_file(
        Path(event.dataset_path),
        calling=calling,
        spool=ctx.spool,
        repo=ctx.repo,
        reserve_bytes=ctx.reserve_bytes,
        request=request,
        peer=f"{calling} ({requestor.address})",
    )
    return result


def build_storage_ae(settings: NodeSettings, allow_list: PeerAllowList | None = None) -> AE:
    ae = AE(ae_title=settings.ae_title)
    if allow_list is not None and not allow_list.allow_any:
        # pynetdicom enforces this in its own negotiation (A-ASSOCIATE-RJ 1/1/3), no handler involved. An
        # empty list would mean "anyone" to pynetdicom; an empty allow-list admits no one, which
        # handle_requested enforces.
        ae.require_calling_aet = allow_list.ae_titles
    # A second lock on the called AE title, in pynetdicom's own negotiation (A-ASSOCIATE-RJ 1/1/7), next
    # to handle_requested's check, which logs the refusal.
    ae.require_called_aet = not settings.dicom.accept_any_called_ae
    ae.maximum_pdu_size = settings.dicom.max_pdu
    ae.acse_timeout = settings.dicom.acse_timeout_s
    ae.dimse_timeout = settings.dicom.dimse_timeout_s
    ae.network_timeout = settings.dicom.network_timeout_s
    ae.maximum_associations = settings.dicom.max_associations
    ae.add_supported_context(VERIFICATION_SOP_CLASS)
    for sop_class in IMAGE_STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
    return ae


def _tls_context(tls: DicomTlsSettings) -> ssl.SSLContext:
    try:
        return server_tls_context(tls.cert, tls.key, tls.ca, tls.require_client_cert)
    except OSError as exc:  # ssl.SSLError included
        raise ConfigError("dicom.tls", f"cannot load the certificate, key or CA: {exc}") from exc


def _refusal_alert(alerts: SecurityAlerts | None) -> Callable[[str, str, str], None] | None:
    """Refusals by the listener: connections refused before any A-ASSOCIATE-RQ (limits, deadlines, TLS)
    carry no AE titles; the per-AE limit names the calling AE."""
    if alerts is None:
        return None
    return lambda ip, calling_ae, reason: alerts.note(ip, calling_ae, "", reason)


def _start_server(
    ae: AE,
    address: tuple[str, int],
    handlers: list[Any],
    dicom: DicomSettings,
    alerts: SecurityAlerts | None = None,
) -> NodeAssociationServer:
    """As `AE.start_server(block=False)`, on the node's listener (receive/server.py): connection limits
    and deadlines, and over TLS the handshake off the accept loop."""
    limits = ConnectionLimits(
        max_associations=dicom.max_associations,
        max_associations_per_ip=dicom.max_associations_per_ip,
        max_associations_per_ae=dicom.max_associations_per_ae,
        setup_timeout_s=dicom.association_setup_timeout_s,
        pdu_timeout_s=dicom.pdu_timeout_s,
    )
    tls = dicom.tls
    server = ae.make_server(
        address,
        ssl_context=_tls_context(tls) if tls is not None else None,
        evt_handlers=handlers,
        server_class=NodeAssociationServer,
        guard=ConnectionGuard(limits, on_refused=_refusal_alert(alerts)),
        handshake_timeout_s=tls.handshake_timeout_s if tls is not None else 10,
    )
    assert isinstance(server, NodeAssociationServer)
    thread = threading.Thread(target=server.serve_forever, name="DicomAcceptor", daemon=True)
    thread.start()
    ae._servers.append(server)  # as start_server does: AE.shutdown() stops it, server.shutdown() removes it
    return server


def _release_signals(
    dicom: DicomSettings, repo: SeriesRepository, on_signalled: Callable[[], None] | None
) -> ReleaseSignals | None:
    """The release signal for the AE titles whose every allow-list entry sets `series_complete_on_release`
    (entries that disagree: no signal, the quiet period is the safe side); None when no peer has it."""
    signalling = sorted(signalling_titles(dicom.allowed_peers))
    return ReleaseSignals(repo, signalling, on_signalled) if signalling else None


class StorageSCP:
    """The running SCP; `start()` returns at once (pynetdicom serves in its own threads)."""

    def __init__(
        self,
        settings: NodeSettings,
        spool: Spool,
        repo: SeriesRepository,
        metrics: NodeMetrics | None = None,
        audit: AuditLog | None = None,
        on_series_complete: Callable[[], None] | None = None,
    ) -> None:
        """`on_series_complete`: called (on the association's thread) after a release signalled series
        complete, to run the completion sweep now instead of at its next interval."""
        self.settings = settings
        # With `audit`: one "dicom.instances_transferred" event per association and coalesced
        # "security.alert" events for refused ones (receive/audit.py).
        self.transfers = TransferAudit(audit) if audit is not None else None
        self.alerts = SecurityAlerts(audit) if audit is not None else None
        self.release = _release_signals(settings.dicom, repo, on_series_complete)
        self.ctx = StoreContext(
            spool, repo, settings.disk_reserve_mb * 1024 * 1024, metrics, self.transfers, self.release
        )
        self.allow_list = PeerAllowList(settings.dicom.allowed_peers, settings.dicom.allow_any_peer)
        # The called AE title must be ours (A-ASSOCIATE-RJ reason 7 otherwise) unless the admin lets any
        # through for a PACS that sends a wrong one.
        self._called_ae_title = None if settings.dicom.accept_any_called_ae else settings.ae_title.strip()
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
            (evt.EVT_REQUESTED, handle_requested, [self.allow_list, self._called_ae_title, self.alerts]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.ctx]),
        ]
        if self.transfers is not None:
            handlers += [
                (evt.EVT_RELEASED, handle_association_end, [self.transfers, "released"]),
                (evt.EVT_ABORTED, handle_association_end, [self.transfers, "aborted"]),
                (evt.EVT_CONN_CLOSE, handle_association_end, [self.transfers, "closed"]),
            ]
        if self.release is not None:
            handlers += [
                (evt.EVT_RELEASED, handle_release_signal, [self.release]),
                (evt.EVT_ABORTED, handle_abort_signal, [self.release]),
            ]
        if self.alerts is not None:
            self.alerts.start()
        address = (self.settings.dicom.bind, self.settings.dicom.port)
        tls = self.settings.dicom.tls
        self._server = _start_server(self.ae, address, handlers, self.settings.dicom, self.alerts)
        log.info(
            "DICOM SCP %s listening on %s:%d%s",
            self.settings.ae_title,
            *address,
            " (DICOM TLS only)" if tls is not None else "",
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self, grace_s: float = 0) -> None:
        """Close the listener at once (new associations are refused: nothing listens on the port), let the
        associations in flight go on for up to `grace_s` seconds, then end the rest with an A-ABORT.

        Returns only when every association thread has ended (within bounds), so the C-STORE one may be
        storing when it is aborted finishes first: its instance is then stored but not acknowledged (the
        sender sends it again; duplicates are kept once), never left between its spool file and its row.
        """
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            _drain(list(server.active_associations), grace_s)
        if self.alerts is not None:
            self.alerts.stop()  # writes the refusals of the still-open window


# After an A-ABORT, how long to wait for the peer to close the connection (pynetdicom's ARTIM timer; then
# the connection is closed anyway) and for the association's current C-STORE to finish.
_ABORT_WAIT_S = 5.0


def _drain(assocs: list[Any], grace_s: float) -> None:
    """Wait up to `grace_s` for `assocs` (acceptor threads) to end by themselves, then abort the rest."""
    deadline = time.monotonic() + grace_s
    for assoc in assocs:
        assoc.join(max(0.0, deadline - time.monotonic()))
    still_open = [assoc for assoc in assocs if assoc.is_alive()]
    if not still_open:
        return
    log.warning("shutdown: aborting %d association(s) still open after %g s", len(still_open), grace_s)

    def abort(assoc: Any) -> None:
        assoc.acse_timeout = _ABORT_WAIT_S  # the ARTIM timer: a peer that never closes cannot hold us
        assoc.abort()
        # One still waiting for its A-ASSOCIATE-RQ (the listener's watchdog, which would wake it, has
        # stopped) ends now, not after the ACSE timeout.
        _wake_acceptor(assoc)

    # In parallel: each abort waits for its peer to close the connection.
    aborts = [
        threading.Thread(target=abort, args=(a,), name="DicomShutdownAbort", daemon=True) for a in still_open
    ]
    for thread in aborts:
        thread.start()
    deadline = time.monotonic() + 2 * _ABORT_WAIT_S
    for thread in [*aborts, *still_open]:
        thread.join(max(0.0, deadline - time.monotonic()))
    left = sum(1 for assoc in still_open if assoc.is_alive())
    if left:
        log.error("shutdown: %d aborted association(s) did not end within %g s", left, 2 * _ABORT_WAIT_S)
