"""AE-title (+ optional IP) allow-list for incoming associations.

This is access control, not authentication: any peer can claim an AE title, and only the address narrows
that down (DICOM TLS with client certificates would authenticate; not implemented yet).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from dicom_ai_node.domain.peers import AllowedPeer


class PeerAllowList:
    def __init__(self, peers: Sequence[AllowedPeer], allow_any: bool = False) -> None:
        self.allow_any = allow_any
        self._peers: dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {}
        for peer in peers:
            nets = [ipaddress.ip_network(h, strict=False) for h in peer.hosts]
            self._peers.setdefault(peer.ae_title, []).extend(nets)

    @property
    def ae_titles(self) -> list[str]:
        """The calling AE titles on the list (any address)."""
        return sorted(self._peers)

    def is_allowed(self, calling_ae: str, address: str) -> bool:
        if self.allow_any:
            return True
        calling_ae = calling_ae.strip()
        if calling_ae not in self._peers:
            return False
        networks = self._peers[calling_ae]
        if not networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in networks)
