"""DICOM TLS on the SCP (PS3.15 B.9, BCP 195): the peer certificate of an association, handshake reasons.

The listener itself (handshake off the accept loop, under a deadline) is receive/server.py.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
from typing import Any

from dicom_ai_node.domain.peers import subject_from_ssl
from dicom_ai_node.receive.allowlist import PeerCertificate

log = logging.getLogger(__name__)


def handshake_failure_reason(exc: BaseException) -> str:
    """OpenSSL's reason for a failed handshake, for the log (never certificate content)."""
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.__class__.__name__
    if isinstance(exc, TimeoutError | socket.timeout):
        return "no handshake within the deadline"
    return exc.__class__.__name__


def peer_certificate(assoc: Any) -> PeerCertificate | None:
    """The verified client certificate of an association over TLS; None on plain TCP or when the peer sent
    none (or, with verification off, one that could not be verified)."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return None
    der = sock.getpeercert(binary_form=True)
    info = sock.getpeercert()
    if not der or not info:  # getpeercert() is empty unless the chain was verified
        return None
    subject: Any = info.get("subject", ())
    return PeerCertificate(subject=subject_from_ssl(subject), sha256=hashlib.sha256(der).hexdigest())
