"""Connection limits and deadlines for the DICOM port: what keeps one peer from locking the node out.

pynetdicom reads a PDU until its declared length has arrived, and every open TCP connection holds one
of `AE.maximum_associations` slots before any AE title is known; its ACSE timeout only covers a peer
that sends nothing. So a peer that sends a few bytes of a PDU header and stops, or garbage, holds a
thread and a slot for as long as it likes. The guard counts connections per peer IP (and in total) at
accept, admits calling AE titles up to a per-AE limit, and tells its server which connections have
missed a deadline: no A-ASSOCIATE-AC/RJ within `setup_timeout_s` of the TCP accept, or a PDU whose
header arrived but whose rest has not within `pdu_timeout_s`. Each kind of refusal or timeout is logged
at most once per peer IP per `log_interval_s`, with a count of those left out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    max_associations: int
    max_associations_per_ip: int
    max_associations_per_ae: int
    setup_timeout_s: float
    pdu_timeout_s: float
    log_interval_s: float = 60.0


class RateLimitedLog:
    """At most one warning per key per `interval_s`; the next one says how many were left out."""

    def __init__(
        self, logger: logging.Logger, interval_s: float, clock: Callable[[], float] = time.monotonic
    ):
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
            if len(self._last) > 10_000:  # many distinct peers: forget the old ones, keep memory bounded
                self._last = {k: t for k, t in self._last.items() if now - t < self._interval_s}
        if suppressed:
            self._logger.warning(
                msg + " (%d more like this in the last %.0f s not logged)",
                *args,
                suppressed,
                self._interval_s,
            )
        else:
            self._logger.warning(msg, *args)


@dataclass
class _Connection:
    ip: str
    accepted_at: float
    settled: bool = False  # A-ASSOCIATE-AC or -RJ sent (or the association ended)
    calling_ae: str | None = None
    pdu_started_at: float | None = None
    expired: bool = False


@dataclass(frozen=True)
class Expired:
    key: Hashable
    ip: str
    reason: str


@dataclass
class ConnectionGuard:
    """Thread-safe book of open connections, keyed by the server's request socket."""

    limits: ConnectionLimits
    clock: Callable[[], float] = time.monotonic
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _open: dict[Hashable, _Connection] = field(default_factory=dict)
    _log: RateLimitedLog | None = None
    # Called with (peer IP, calling AE title or "", reason) for every connection refused or closed
    # here, for the audit's coalesced security alerts (receive/audit.py); it must only touch memory.
    on_refused: Callable[[str, str, str], None] | None = None

    def __post_init__(self) -> None:
        self._log = RateLimitedLog(log, self.limits.log_interval_s, self.clock)

    def refused(self, ip: str, msg: str, *args: object) -> None:
        assert self._log is not None
        # One line per peer IP and kind of refusal: a flood of refusals does not hide the timeouts.
        self._log.warning(f"{ip} {msg}", msg, *args)

    def admit(self, key: Hashable, ip: str) -> bool:
        """At TCP accept: False (and a rate-limited warning) when the IP or the node is at its limit."""
        with self._lock:
            total = len(self._open)
            from_ip = sum(1 for c in self._open.values() if c.ip == ip)
            if total < self.limits.max_associations and from_ip < self.limits.max_associations_per_ip:
                self._open[key] = _Connection(ip, self.clock())
                return True
        if self.on_refused is not None:
            per_ip = from_ip >= self.limits.max_associations_per_ip
            self.on_refused(ip, "", "connection limit per address" if per_ip else "connection limit in total")
        if from_ip >= self.limits.max_associations_per_ip:
            self.refused(
                ip,
                "DICOM connection from %s refused: %d open from this address (limit %d)",
                ip,
                from_ip,
                self.limits.max_associations_per_ip,
            )
        else:
            self.refused(
                ip,
                "DICOM connection from %s refused: %d open in total (limit %d)",
                ip,
                total,
                self.limits.max_associations,
            )
        return False

    def claim_calling_ae(self, key: Hashable, calling_ae: str) -> bool:
        """At A-ASSOCIATE-RQ, after the allow-list: False when `calling_ae` already holds its limit."""
        with self._lock:
            conn = self._open.get(key)
            held = sum(1 for k, c in self._open.items() if c.calling_ae == calling_ae and k != key)
            if held >= self.limits.max_associations_per_ae:
                admitted = False
            else:
                admitted = True
                if conn is not None:
                    conn.calling_ae = calling_ae
        if not admitted:
            ip = conn.ip if conn is not None else "?"
            self.refused(
                ip,
                "association from %s rejected: calling AE %r holds %d associations (limit %d)",
                ip,
                calling_ae,
                held,
                self.limits.max_associations_per_ae,
            )
        return admitted

    def settled(self, key: Hashable) -> None:
        with self._lock:
            conn = self._open.get(key)
            if conn is not None:
                conn.settled = True

    def pdu_started(self, key: Hashable) -> None:
        with self._lock:
            conn = self._open.get(key)
            if conn is not None:
                conn.pdu_started_at = self.clock()

    def pdu_finished(self, key: Hashable) -> None:
        with self._lock:
            conn = self._open.get(key)
            if conn is not None:
                conn.pdu_started_at = None

    def release(self, key: Hashable) -> None:
        with self._lock:
            self._open.pop(key, None)

    def open_count(self, ip: str | None = None) -> int:
        with self._lock:
            return sum(1 for c in self._open.values() if ip is None or c.ip == ip)

    def expire(self) -> list[Expired]:
        """Connections past a deadline, each returned once (the server closes them)."""
        now = self.clock()
        expired: list[Expired] = []
        with self._lock:
            for key, conn in self._open.items():
                if conn.expired:
                    continue
                if not conn.settled and now - conn.accepted_at > self.limits.setup_timeout_s:
                    reason = f"no association within {self.limits.setup_timeout_s:g} s of connecting"
                elif (
                    conn.pdu_started_at is not None and now - conn.pdu_started_at > self.limits.pdu_timeout_s
                ):
                    reason = f"PDU incomplete {self.limits.pdu_timeout_s:g} s after its header"
                else:
                    continue
                conn.expired = True
                expired.append(Expired(key, conn.ip, reason))
        for item in expired:
            self.refused(item.ip, "DICOM connection from %s closed: %s", item.ip, item.reason)
            if self.on_refused is not None:
                self.on_refused(item.ip, "", item.reason)
        return expired
