"""DICOM TLS on the SCP (PS3.15 B.9, BCP 195): a listener whose handshake never blocks the accept loop.

pynetdicom's own TLS server runs the handshake inside `accept` on the single listener thread, on a socket
without a timeout: one client that connects and sends nothing would stall every other peer. Here the
listener only wraps the socket; the handshake runs in the connection's own thread under a deadline.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from dicom_ai_node.domain.peers import subject_from_ssl
from dicom_ai_node.receive.allowlist import PeerCertificate

log = logging.getLogger(__name__)


class TlsAssociationServer(ThreadedAssociationServer):
    """`AE.make_server(..., ssl_context=ctx, server_class=TlsAssociationServer, handshake_timeout_s=...)`."""

    def __init__(self, *args: Any, handshake_timeout_s: float = 10, **kwargs: Any) -> None:
        self.handshake_timeout_s = handshake_timeout_s
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None and self.ssl_context is not None
        client_socket, address = self.socket.accept()
        wrapped = self.ssl_context.wrap_socket(client_socket, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Runs in the connection's thread: handshake first (bounded), then pynetdicom's association."""
        assert isinstance(request, ssl.SSLSocket)
        timeout = request.gettimeout()
        request.settimeout(self.handshake_timeout_s)
        try:
            request.do_handshake()
        except (OSError, ValueError) as exc:  # ssl.SSLError, a timeout, a reset: the peer is refused
            # Only the address and OpenSSL's reason: no certificate content reaches the log.
            log.warning("DICOM TLS handshake with %s refused: %s", client_address[0], _reason(exc))
            return  # socketserver closes the socket (shutdown_request)
        request.settimeout(timeout)
        super().finish_request(request, client_address)


def _reason(exc: BaseException) -> str:
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
