"""C-STORE SCU: send files to a DICOM peer, classifying failures as transient or permanent.

Proposes only the (SOP class, transfer syntax) pairs the files need, plus uncompressed fallbacks, so a
PACS's 128-context limit is never an issue. Statuses follow PS3.4 Annex B: 0xA7xx (out of resources) is
transient; 0xA9xx / 0xCxxx and any other failure are permanent; warnings (0xB0xx) count as stored.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

from dicom_ai_node.dimse_socket import client_tls_context, set_tcp_nodelay
from dicom_ai_node.domain.conformance import VERIFICATION_SOP_CLASS
from dicom_ai_node.domain.peers import DestinationTls
from dicom_ai_node.errors import (
    InvalidDicomError,
    PermanentDeliveryError,
    QueryNotSupportedError,
    TransientDeliveryError,
)

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128
# Study Root Query/Retrieve Information Model - FIND (PS3.4 C.6.2), for read-back verification.
STUDY_ROOT_FIND = UID(
    "1.2.840.10008.5.1.4.1.2.2.1"
)  # PS3.8 9.3.2.2: at most 128 presentation contexts per association
# PS3.7 C.4.1.1.4: "Refused: SOP Class not supported", as a C-FIND status.
_SOP_CLASS_NOT_SUPPORTED = 0x0122
# A-ASSOCIATE-RJ Result (PS3.8 9.3.4).
_REJECTED_PERMANENT = 0x01
_REJECTED_TRANSIENT = 0x02


@dataclass(frozen=True)
class DicomPeer:
    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "AINODE"
    max_pdu: int = 131072
    timeout_s: float = 60
    tls: DestinationTls | None = None  # DICOM TLS (BCP 195) when set


@dataclass
class StoreReport:
    sent: list[str] = field(default_factory=list)  # SOP Instance UIDs stored (incl. warnings)
    warnings: dict[str, int] = field(default_factory=dict)


def _is_transient_status(status: int) -> bool:
    return 0xA700 <= status <= 0xA7FF


def _is_stored(status: int) -> bool:
    return status == 0x0000 or 0xB000 <= status <= 0xBFFF


def _file_contexts(paths: Sequence[Path]) -> dict[Path, list[tuple[str, str]]]:
    """(SOP class, transfer syntax) pairs each file needs: its own syntax plus uncompressed fallbacks."""
    needs: dict[Path, list[tuple[str, str]]] = {}
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except (OSError, ValueError, EOFError) as exc:
            raise InvalidDicomError(f"cannot read {path.name}: {exc}") from exc
        sop_class = str(ds.file_meta.MediaStorageSOPClassUID)
        tsyntax = str(ds.file_meta.TransferSyntaxUID)
        needs[path] = list(
            dict.fromkeys((sop_class, ts) for ts in (tsyntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian))
        )
    return needs


def _build_ae(peer: DicomPeer) -> AE:
    ae = AE(ae_title=peer.calling_ae_title)
    ae.maximum_pdu_size = peer.max_pdu
    ae.acse_timeout = peer.timeout_s
    ae.dimse_timeout = peer.timeout_s
    ae.network_timeout = peer.timeout_s
    return ae


def _tls_args(peer: DicomPeer) -> tuple[ssl.SSLContext, str] | None:
    if peer.tls is None:
        return None
    try:
        context = client_tls_context(peer.tls.ca, peer.tls.cert, peer.tls.key)
    except OSError as exc:  # ssl.SSLError included: a missing or unreadable CA, certificate or key
        raise PermanentDeliveryError(
            f"TLS to {peer.ae_title}: cannot load the CA, certificate or key: {exc}"
        ) from exc
    # server_hostname: the PACS's certificate must name the host it is reached at.
    return context, peer.host


def _associate(
    ae: AE,
    peer: DicomPeer,
    contexts: list[PresentationContext],
    refused: type[PermanentDeliveryError] = PermanentDeliveryError,
) -> object:
    """An established association; `refused` is raised when the peer accepts none of `contexts`."""
    assoc = ae.associate(
        peer.host,
        peer.port,
        contexts=contexts,
        ae_title=peer.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
        tls_args=_tls_args(peer),
    )
    if assoc.is_rejected:
        raise _rejection(assoc, peer)
    if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
        # The peer answered but accepts none of the proposed SOP classes / transfer syntaxes: a retry
        # will not change its mind (e.g. a PACS that does not know the LABELMAP SEG SOP class).
        refused_classes = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
        raise refused(
            f"{peer.ae_title} accepts none of the proposed SOP classes: {', '.join(refused_classes)}"
        )
    if not assoc.is_established:
        over = " over TLS (see the log for the handshake error)" if peer.tls is not None else ""
        raise TransientDeliveryError(f"cannot associate with {peer.ae_title}@{peer.host}:{peer.port}{over}")
    return assoc


def _rejection(assoc: Association, peer: DicomPeer) -> PermanentDeliveryError | TransientDeliveryError:
    """The error for an A-ASSOCIATE-RJ, with its result, source and reason (PS3.8 9.3.4).

    "Rejected (transient)" (e.g. 2/3/2, local limit exceeded: a PACS at its association limit) may be
    accepted on a later try, so it is retried with backoff; "rejected (permanent)" (an unknown calling or
    called AE title) will not change without an admin, so it goes to the dead letter at once.
    """
    rj = getattr(assoc.acceptor, "primitive", None)
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    if rj is None or rj.result not in (_REJECTED_PERMANENT, _REJECTED_TRANSIENT):
        return PermanentDeliveryError(f"association rejected by {where}")
    message = (
        f"association rejected by {where}: {rj.result_str.lower()}, {rj.source_str.lower()}, "
        f"{rj.reason_str.lower()} ({rj.result}/{rj.result_source}/{rj.diagnostic})"
    )
    if rj.result == _REJECTED_TRANSIENT:
        return TransientDeliveryError(message)
    return PermanentDeliveryError(message)


def echo(peer: DicomPeer) -> int:
    """C-ECHO the peer; returns the status (0x0000 on success)."""
    ae = _build_ae(peer)
    assoc = _associate(ae, peer, [build_context(VERIFICATION_SOP_CLASS)])
    try:
        status = assoc.send_c_echo()  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]
    if not status:
        raise TransientDeliveryError(f"no C-ECHO response from {peer.ae_title}")
    return int(status.Status)


def send_files(
    paths: Sequence[Path],
    peer: DicomPeer,
    progress: Callable[[Path, int], None] | None = None,
) -> StoreReport:
    """C-STORE every file over associations of at most 128 contexts; raise on the first failure."""
    report = StoreReport()
    paths = [Path(p) for p in paths]
    by_file = _file_contexts(paths)
    # Group files so that each association's contexts fit the limit (usually one association).
    batches: list[tuple[list[tuple[str, str]], list[Path]]] = []
    current_pairs: list[tuple[str, str]] = []
    current_paths: list[Path] = []
    for path in paths:
        needed = [pr for pr in by_file[path] if pr not in current_pairs]
        if len(current_pairs) + len(needed) > MAX_CONTEXTS and current_paths:
            batches.append((current_pairs, current_paths))
            current_pairs, current_paths = [], []
        current_pairs.extend(pr for pr in by_file[path] if pr not in current_pairs)
        current_paths.append(path)
    if current_paths:
        batches.append((current_pairs, current_paths))

    ae = _build_ae(peer)
    for batch_pairs, batch_paths in batches:
        contexts = []
        for sop_class in dict.fromkeys(sc for sc, _ in batch_pairs):
            syntaxes = [ts for sc, ts in batch_pairs if sc == sop_class]
            contexts.append(build_context(sop_class, syntaxes))
        assoc = _associate(ae, peer, contexts[:MAX_CONTEXTS])
        try:
            for path in batch_paths:
                _store_one(assoc, path, peer, report)
                if progress is not None:
                    progress(path, len(report.sent))
        finally:
            if assoc.is_established:  # type: ignore[attr-defined]
                assoc.release()  # type: ignore[attr-defined]
    return report


def _store_one(assoc: object, path: Path, peer: DicomPeer, report: StoreReport) -> None:
    try:
        status = assoc.send_c_store(path)  # type: ignore[attr-defined]
    except ValueError as exc:
        # No accepted presentation context for this SOP class / transfer syntax.
        raise PermanentDeliveryError(f"{peer.ae_title} accepts no context for {path.name}: {exc}") from exc
    if not status:
        raise TransientDeliveryError(f"no C-STORE response from {peer.ae_title} (timeout or abort)")
    code = int(status.Status)
    sop_uid = str(getattr(status, "AffectedSOPInstanceUID", "") or path.stem)
    if _is_stored(code):
        report.sent.append(sop_uid)
        if code != 0:
            report.warnings[sop_uid] = code
        return
    message = f"{peer.ae_title} answered C-STORE of SOP {sop_uid} with 0x{code:04X}"
    if _is_transient_status(code):
        raise TransientDeliveryError(message)
    raise PermanentDeliveryError(message)


def find_sop_instances(peer: DicomPeer, study_instance_uid: str, series_instance_uid: str) -> set[str]:
    """C-FIND (Study Root, IMAGE level): the SOP Instance UIDs the peer holds in one series."""
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study_instance_uid
    query.SeriesInstanceUID = series_instance_uid
    query.SOPInstanceUID = ""
    ae = _build_ae(peer)
    # A store-only peer (DCMTK storescp, many archives' ingest ports) refuses the FIND context: it
    # stored what it got but cannot say so, which is no reason to send again.
    assoc = _associate(ae, peer, [build_context(STUDY_ROOT_FIND)], refused=QueryNotSupportedError)
    found: set[str] = set()
    try:
        for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):  # type: ignore[attr-defined]
            if not status:
                raise TransientDeliveryError(f"no C-FIND response from {peer.ae_title} (timeout or abort)")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01) and identifier is not None:
                found.add(str(identifier.SOPInstanceUID))
            elif code == _SOP_CLASS_NOT_SUPPORTED:
                raise QueryNotSupportedError(
                    f"{peer.ae_title} answered C-FIND with 0x{code:04X} (SOP class not supported)"
                )
            elif code != 0x0000:
                raise PermanentDeliveryError(f"{peer.ae_title} answered C-FIND with 0x{code:04X}")
    finally:
        if assoc.is_established:  # type: ignore[attr-defined]
            assoc.release()  # type: ignore[attr-defined]
    return found
