"""AE-title (+ optional IP, + optional TLS client certificate) allow-list for incoming associations.

An AE title and an address are access control, not authentication: any peer can claim an AE title. DICOM
TLS with client certificates (PS3.15 B.9) authenticates; an allowed peer with `tls_subject` or
`tls_fingerprint` is bound to its certificate, and a calling AE that presents another one is refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from dicom_ai_node.domain.peers import AllowedPeer, SubjectName, parse_subject

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class PeerCertificate:
    """The client certificate of a TLS association, as the handshake verified it."""

    subject: SubjectName
    sha256: str  # lower-case hex of the DER encoding


@dataclass(frozen=True)
class _Entry:
    networks: tuple[_Network, ...]
    subject: SubjectName | None
    sha256: str | None

    def admits(
        self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, cert: PeerCertificate | None
    ) -> bool:
        if self.networks and (ip is None or not any(ip in net for net in self.networks)):
            return False
        if self.subject is None and self.sha256 is None:
            return True
        # Bound to a certificate: fail closed without one.
        if cert is None:
            return False
        if self.subject is not None and cert.subject != self.subject:
            return False
        return self.sha256 is None or cert.sha256 == self.sha256


class PeerAllowList:
    """Each `AllowedPeer` entry admits its AE title on its own terms; several entries with one AE title
    admit a peer that satisfies any of them."""

    def __init__(self, peers: Sequence[AllowedPeer], allow_any: bool = False) -> None:
        self.allow_any = allow_any
        self._peers: dict[str, list[_Entry]] = {}
        for peer in peers:
            entry = _Entry(
                networks=tuple(ipaddress.ip_network(h, strict=False) for h in peer.hosts),
                subject=parse_subject(peer.tls_subject) if peer.tls_subject is not None else None,
                sha256=peer.tls_fingerprint,
            )
            self._peers.setdefault(peer.ae_title, []).append(entry)

    @property
    def ae_titles(self) -> list[str]:
        """The calling AE titles on the list (any address)."""
        return sorted(self._peers)

    def is_allowed(self, calling_ae: str, address: str, certificate: PeerCertificate | None = None) -> bool:
        if self.allow_any:
            return True
        entries = self._peers.get(calling_ae.strip())
        if not entries:
            return False
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(address)
        except ValueError:
            ip = None
        return any(entry.admits(ip, certificate) for entry in entries)
