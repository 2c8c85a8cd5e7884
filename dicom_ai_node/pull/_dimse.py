"""Query/Retrieve SCU plumbing shared by C-FIND, C-MOVE and C-GET: the AE, the association, statuses.

Statuses follow PS3.4 C.4: 0xFF00/0xFF01 pending, 0x0000 success, 0xB000 warning (some sub-operations
failed), 0xFE00 cancelled, 0xA7xx out of resources (transient), 0xA9xx / 0xCxxx and 0xA801 (move
destination unknown) permanent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.presentation import PresentationContext

from dicom_ai_node.dimse_socket import set_tcp_nodelay
from dicom_ai_node.domain.peers import Source
from dicom_ai_node.errors import PermanentPullError, TransientPullError

PENDING = (0xFF00, 0xFF01)


@dataclass(frozen=True)
class QrPeer:
    """A DIMSE source as the SCU talks to it."""

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    max_pdu: int = 131072
    timeout_s: float = 60

    @property
    def label(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"


def qr_peer(source: Source, node_ae_title: str) -> QrPeer:
    assert source.ae_title and source.host and source.port  # guaranteed by Source's validator
    return QrPeer(
        name=source.name,
        ae_title=source.ae_title,
        host=source.host,
        port=source.port,
        calling_ae_title=source.calling_ae_title or node_ae_title,
        max_pdu=source.max_pdu,
        timeout_s=source.timeout_s,
    )


def associate(
    peer: QrPeer,
    contexts: Sequence[PresentationContext],
    *,
    ext_neg: Sequence[Any] = (),
    handlers: Sequence[Any] = (),
) -> Any:
    """An established association, or a typed error: rejected -> permanent, unreachable -> transient."""
    ae = AE(ae_title=peer.calling_ae_title)
    ae.maximum_pdu_size = peer.max_pdu
    ae.acse_timeout = peer.timeout_s
    ae.dimse_timeout = peer.timeout_s
    ae.network_timeout = peer.timeout_s
    assoc = ae.associate(
        peer.host,
        peer.port,
        contexts=list(contexts),
        ae_title=peer.ae_title,
        ext_neg=list(ext_neg) or None,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay), *handlers],
    )
    if assoc.is_rejected:
        raise PermanentPullError(f"association rejected by {peer.label}")
    if not assoc.is_established:
        raise TransientPullError(f"cannot associate with {peer.label}")
    return assoc


def check_final(peer: QrPeer, operation: str, code: int) -> None:
    """Raise for a failed final status; success and warning (0xB000) pass."""
    if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
        return
    message = f"{peer.label} answered {operation} with 0x{code:04X}"
    if code == 0xA801:
        message += f" (move destination unknown: add the node's AE title to {peer.name}'s known AEs)"
    if 0xA700 <= code <= 0xA7FF:
        raise TransientPullError(message)
    raise PermanentPullError(message)
