"""Socket tuning shared by the SCP (receive) and the SCU (deliver)."""

from __future__ import annotations

import logging
import socket

from pynetdicom.events import Event

log = logging.getLogger(__name__)


def set_tcp_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN handler: turn Nagle off.

    pynetdicom never sets TCP_NODELAY; with Nagle on, each C-STORE response waits ~45 ms and sending is
    2-4x slower (measured with storescu and pynetdicom over loopback).
    """
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        try:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            log.debug("could not set TCP_NODELAY", exc_info=True)
