"""The DICOM listener, plain or TLS: connection limits at accept, deadlines enforced by one watchdog.

`AE.make_server(..., server_class=NodeAssociationServer, guard=ConnectionGuard(...))`. Over TLS the
listener only wraps the socket; the handshake runs in the connection's own thread under its deadline
(pynetdicom's own TLS server runs it inside `accept`, on a socket without a timeout, so one silent
client would stall every other peer).

A connection past a deadline (receive/guard.py) is closed by shutting its socket down, which ends the
DUL's blocking read; an association thread still waiting for its A-ASSOCIATE-RQ is woken at once rather
than after the ACSE timeout, so its slot is free again within one watchdog tick.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Any

from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from dicom_ai_node.domain.conformance import REJECT_LOCAL_LIMIT
from dicom_ai_node.receive.guard import ConnectionGuard
from dicom_ai_node.receive.tls import handshake_failure_reason

log = logging.getLogger(__name__)

_WATCHDOG_TICK_S = 0.1


class NodeAssociationServer(ThreadedAssociationServer):
    # The listen backlog (socketserver's default is 5): a burst of connections, refused or not, must not
    # make a legitimate peer's SYN wait for a retransmission (1 s, then 3 s...).
    request_queue_size = 128

    def __init__(
        self, *args: Any, guard: ConnectionGuard, handshake_timeout_s: float = 10, **kwargs: Any
    ) -> None:
        self.guard = guard
        self.handshake_timeout_s = handshake_timeout_s
        # request socket -> its Association (set at EVT_CONN_OPEN); guarded by _assoc_lock
        self._assocs: dict[socket.socket, Any] = {}
        self._assoc_lock = threading.Lock()
        self._stopped = threading.Event()
        super().__init__(*args, **kwargs)
        self.bind(evt.EVT_CONN_OPEN, self._on_conn_open)
        # Bound after the node's own EVT_REQUESTED handler (evt_handlers, bound by super().__init__), so
        # the per-AE limit counts only calling AEs that the allow-list admitted.
        self.bind(evt.EVT_REQUESTED, self._on_requested)
        self.bind(evt.EVT_ACCEPTED, self._on_settled)
        self.bind(evt.EVT_REJECTED, self._on_settled)
        self._watchdog = threading.Thread(target=self._watch, name="DicomConnectionWatchdog", daemon=True)
        self._watchdog.start()

    # -- accept ---------------------------------------------------------------------------------------
    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client_socket, address = self.socket.accept()
        if self.ssl_context is None:
            return client_socket, address
        wrapped = self.ssl_context.wrap_socket(client_socket, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Per-IP and total limits, before any thread is started (socketserver closes refused sockets)."""
        return self.guard.admit(request, str(client_address[0]))

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Runs in the connection's thread: TLS handshake first (bounded), then pynetdicom's association."""
        if isinstance(request, ssl.SSLSocket):
            timeout = request.gettimeout()
            request.settimeout(self.handshake_timeout_s)
            try:
                request.do_handshake()
            except (OSError, ValueError) as exc:  # ssl.SSLError, a timeout, a reset: the peer is refused
                # Only the address and OpenSSL's reason: no certificate content reaches the log.
                reason = handshake_failure_reason(exc)
                log.warning("DICOM TLS handshake with %s refused: %s", client_address[0], reason)
                if self.guard.on_refused is not None:
                    self.guard.on_refused(str(client_address[0]), "", f"TLS handshake: {reason}")
                self.shutdown_request(request)
                return
            request.settimeout(timeout)
        super().finish_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.guard.release(request)
        with self._assoc_lock:
            self._assocs.pop(request, None)
        super().shutdown_request(request)

    # -- association events ---------------------------------------------------------------------------
    def _on_conn_open(self, event: Event) -> None:
        assoc = event.assoc
        dul = assoc.dul
        request = dul.socket.socket if dul.socket is not None else None
        if request is None:
            return
        with self._assoc_lock:
            self._assocs[request] = assoc
        read_pdu = dul._read_pdu_data
        guard = self.guard

        # The DUL only reads once select() says bytes are waiting, then blocks until the whole declared
        # PDU has arrived: the time inside this call is the time a PDU has been incomplete.
        def read_pdu_with_deadline() -> None:
            guard.pdu_started(request)
            try:
                read_pdu()
            finally:
                guard.pdu_finished(request)

        dul._read_pdu_data = read_pdu_with_deadline  # type: ignore[method-assign]

    def _on_requested(self, event: Event) -> None:
        """The per-calling-AE limit: A-ASSOCIATE-RJ 2/3/2 (transient, local limit exceeded) over it."""
        assoc = event.assoc
        request = assoc.dul.socket.socket if assoc.dul.socket else None
        if assoc.is_rejected or assoc.is_aborted:  # already refused by the allow-list check
            self.guard.settled(request)
            return
        primitive = assoc.requestor.primitive
        calling_ae = str(primitive.calling_ae_title).strip() if primitive is not None else ""
        if self.guard.claim_calling_ae(request, calling_ae):
            return
        if self.guard.on_refused is not None:
            self.guard.on_refused(
                str(assoc.requestor.address), calling_ae, "association limit per calling AE"
            )
        try:
            assoc.acse.send_reject(*REJECT_LOCAL_LIMIT)
        finally:
            assoc.kill()  # as handle_requested does: the DUL flushes the A-ASSOCIATE-RJ, nothing else runs
            self.guard.settled(request)

    def _on_settled(self, event: Event) -> None:
        self.guard.settled(event.assoc.dul.socket.socket if event.assoc.dul.socket else None)

    # -- deadlines ------------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stopped.wait(_WATCHDOG_TICK_S):
            for expired in self.guard.expire():
                self._close(expired.key)
            self._prune()

    def _close(self, request: Any) -> None:
        with self._assoc_lock:
            assoc = self._assocs.get(request)
        try:
            # The plain socket's shutdown, also under TLS: it wakes the DUL's blocking read without
            # touching the SSL object another thread is reading through.
            socket.socket.shutdown(request, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed
        if assoc is not None:
            _wake_acceptor(assoc)

    def _prune(self) -> None:
        """Forget connections whose association thread has ended (not every path calls shutdown_request)."""
        with self._assoc_lock:
            items = list(self._assocs.items())
        for request, assoc in items:
            if assoc.ident is not None and not assoc.is_alive():
                self.guard.release(request)
                with self._assoc_lock:
                    self._assocs.pop(request, None)
            elif request.fileno() == -1:
                _wake_acceptor(assoc)  # closed by the peer before its A-ASSOCIATE-RQ: free the slot now

    def shutdown(self) -> None:
        self._stopped.set()
        super().shutdown()


def _wake_acceptor(assoc: Any) -> None:
    """An acceptor waiting for its A-ASSOCIATE-RQ waits `acse_timeout` on the DUL's user queue even when
    the connection is gone; None there is what it gets on that timeout, so it ends now, as it would then."""
    if assoc.requestor.primitive is None and not assoc.is_established:
        assoc.dul.to_user_queue.put(None)
