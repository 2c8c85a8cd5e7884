"""Audit records of the DICOM edge, in the spirit of PS3.15 A.5 (IHE ATNA).

- `TransferAudit`: one "dicom.instances_transferred" event (A.5.3.10 "DICOM Instances Transferred",
  role: destination) per association that carried C-STORE requests, written when it ends (release, abort
  or a closed connection). One row per association, not per instance, so a 2,000-image study is one row.
- `SecurityAlerts`: one "security.alert" event (A.5.3.11 "Security Alert") per refused peer address and
  minute, with the count: a hostile peer retrying in a loop cannot flood the audit table.

Only AE titles, addresses, UIDs, counts and statuses are written: never a patient name, ID or any other
header value (the instances' headers are not even read here).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dicom_ai_node.domain.ingest import IngestResult
from dicom_ai_node.persistence.audit import AuditLog

log = logging.getLogger(__name__)

ACTION_TRANSFERRED = "dicom.instances_transferred"
ACTION_SECURITY_ALERT = "security.alert"
# At most this many study UIDs in one event's detail (the count is always there).
MAX_STUDIES = 20
ALERT_WINDOW_S = 60.0
# Distinct peer addresses pending at once; beyond, refusals are counted under "*" (an address scan).
MAX_ALERT_PEERS = 1000
_MAX_AE_TITLES = 10


def study_target(studies: list[str], more: bool = False) -> str:
    """The audit `target` of a transfer: the study UID, or the first one and how many more."""
    if len(studies) <= 1 and not more:
        return studies[0] if studies else ""
    return f"{studies[0]} (+{len(studies) - 1}{' or more' if more else ''} studies)"


@dataclass
class _Transfer:
    calling_ae: str
    called_ae: str
    address: str
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    size_bytes: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    studies: dict[str, None] = field(default_factory=dict)  # insertion-ordered set


class TransferAudit:
    """Counts each association's C-STORE outcomes and writes one event when the association ends.

    Called on the association threads: `stored` from the C-STORE handler, `finish` from the
    EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE handlers (whichever comes first writes the row).
    """

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit
        self._lock = threading.Lock()
        self._open: dict[Any, _Transfer] = {}

    def stored(self, assoc: Any, result: IngestResult) -> None:
        with self._lock:
            transfer = self._open.get(assoc)
            if transfer is None:
                transfer = self._open[assoc] = _transfer_of(assoc)
            transfer.statuses[f"0x{result.status:04X}"] += 1
            if result.stored:
                transfer.duplicates += result.duplicate
                transfer.stored += not result.duplicate
                transfer.size_bytes += max(0, result.size_bytes)
            else:
                transfer.failed += 1
            if result.study_instance_uid and len(transfer.studies) <= MAX_STUDIES:
                transfer.studies.setdefault(result.study_instance_uid, None)

    def finish(self, assoc: Any, ending: str) -> None:
        """Write the association's event (if it stored or refused anything); `ending`: released,
        aborted or closed."""
        with self._lock:
            transfer = self._open.pop(assoc, None)
        if transfer is None:
            return  # C-ECHO only, rejected, or already written
        studies = list(transfer.studies)[:MAX_STUDIES]
        more = len(transfer.studies) > MAX_STUDIES
        failed = transfer.failed > 0 or ending != "released"
        self._audit.record_quietly(
            actor=transfer.calling_ae,
            source=transfer.address,
            action=ACTION_TRANSFERRED,
            target=study_target(studies, more),
            outcome="failed" if failed else "ok",
            detail={
                "role": "destination",
                "via": "C-STORE",
                "calling_ae": transfer.calling_ae,
                "called_ae": transfer.called_ae,
                "instances": transfer.stored + transfer.duplicates + transfer.failed,
                "stored": transfer.stored,
                "duplicates": transfer.duplicates,
                "failed": transfer.failed,
                "statuses": dict(sorted(transfer.statuses.items())),
                "studies": studies,
                "studies_truncated": more,
                "bytes": transfer.size_bytes,
                "association": ending,
            },
        )


def _transfer_of(assoc: Any) -> _Transfer:
    requestor = assoc.requestor
    primitive = requestor.primitive
    called = str(primitive.called_ae_title).strip() if primitive is not None else ""
    return _Transfer(str(requestor.ae_title).strip(), called, str(requestor.address))


@dataclass
class _Alert:
    first_at: datetime
    started: float  # monotonic
    count: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    calling_aes: dict[str, None] = field(default_factory=dict)
    called_aes: dict[str, None] = field(default_factory=dict)
    last_at: datetime | None = None


class SecurityAlerts:
    """Refused associations, coalesced per peer address: the first refusal opens a window of
    `window_s`; the row (with the count, reasons and AE titles tried) is written when it closes.

    `note` only touches memory (it runs on the refusing association's thread, which must reject at
    once); `flush` writes the closed windows and runs on the SCP's own timer thread (`start`/`stop`),
    and `stop` writes what is still open.
    """

    def __init__(
        self,
        audit: AuditLog,
        *,
        window_s: float = ALERT_WINDOW_S,
        max_peers: int = MAX_ALERT_PEERS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._audit = audit
        self._window_s = window_s
        self._max_peers = max_peers
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._pending: dict[str, _Alert] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def note(self, address: str, calling_ae: str, called_ae: str, reason: str) -> None:
        now = datetime.now(UTC)
        with self._lock:
            key = address if address in self._pending or len(self._pending) < self._max_peers else "*"
            alert = self._pending.get(key)
            if alert is None:
                alert = self._pending[key] = _Alert(first_at=now, started=self._monotonic())
            alert.count += 1
            alert.last_at = now
            alert.reasons[reason] += 1
            for seen, title in ((alert.calling_aes, calling_ae), (alert.called_aes, called_ae)):
                # Refusals before any A-ASSOCIATE-RQ (limits, deadlines, TLS) have no AE titles.
                if title and len(seen) < _MAX_AE_TITLES:
                    seen.setdefault(title, None)

    def flush(self, *, all_open: bool = False) -> int:
        """Write the windows that have closed (`all_open`: every pending one); returns rows written."""
        now = self._monotonic()
        with self._lock:
            due = [
                (address, alert)
                for address, alert in self._pending.items()
                if all_open or now - alert.started >= self._window_s
            ]
            for address, _ in due:
                del self._pending[address]
        for address, alert in due:
            self._write(address, alert)
        return len(due)

    def _write(self, address: str, alert: _Alert) -> None:
        calling = list(alert.calling_aes)
        self._audit.record_quietly(
            actor=",".join(calling) or "(no AE title)",
            source=address,
            action=ACTION_SECURITY_ALERT,
            target=",".join(alert.called_aes),
            outcome="denied",
            detail={
                "alert": "DICOM peer refused",
                "count": alert.count,
                "reasons": dict(alert.reasons),
                "calling_aes": calling,
                "called_aes": list(alert.called_aes),
                "first_at": alert.first_at.isoformat(),
                "last_at": (alert.last_at or alert.first_at).isoformat(),
                "window_s": self._window_s,
            },
        )

    def start(self, interval_s: float = 5.0) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(interval_s,), name="security-alerts", daemon=True
        )
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the timer must survive a bug; the next tick retries
                log.exception("security alerts: flush failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.flush(all_open=True)
