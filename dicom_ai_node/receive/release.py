"""Completion signals at the DICOM edge: "the series of this association are complete once it is released".

Some senders forward each series whole in one association (Orthanc's auto-forward of a stable series is one
store job, one association). For peers marked `series_complete_on_release` (domain/peers.py) the node notes
the series each association stored and, when the peer releases it (A-RELEASE, never A-ABORT or a dropped
connection), records them as complete in the database (`SeriesRepository.signal_series_complete`): the
completion sweep then routes them at once instead of after the quiet period, in whichever node process
runs the next sweep, also after a crash. `on_signalled` wakes this process's sweep now.

EVT_RELEASED comes after pynetdicom has sent the A-RELEASE-RP, so the database write never delays the peer.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from dicom_ai_node.domain.ingest import IngestResult
from dicom_ai_node.domain.peers import AllowedPeer
from dicom_ai_node.errors import DatabaseError
from dicom_ai_node.persistence.repository import SeriesRepository

log = logging.getLogger(__name__)

# Series noted per association; an association storing more (a whole archive migration) signals only
# these, the rest complete by their quiet period.
MAX_SERIES_PER_ASSOCIATION = 10_000


class ReleaseSignals:
    """Series stored per association by peers whose release completes them; thread-safe (pynetdicom
    runs each association on its own thread)."""

    def __init__(
        self,
        repo: SeriesRepository,
        ae_titles: Iterable[str],
        on_signalled: Callable[[], None] | None = None,
    ) -> None:
        self._repo = repo
        self.ae_titles = frozenset(ae_titles)
        self.on_signalled = on_signalled
        self._lock = threading.Lock()
        # Weak keys: an association that ends without EVT_RELEASED or EVT_ABORTED (its DUL thread died)
        # leaves nothing behind once pynetdicom drops it.
        self._open: weakref.WeakKeyDictionary[Any, dict[str, None]] = weakref.WeakKeyDictionary()

    def stored(self, assoc: Any, calling_ae: str, result: IngestResult) -> None:
        """From the C-STORE handler: note the series of an instance answered Success (duplicates too)."""
        if not result.stored or not result.series_instance_uid or calling_ae not in self.ae_titles:
            return
        with self._lock:
            series = self._open.setdefault(assoc, {})
            if len(series) < MAX_SERIES_PER_ASSOCIATION:
                series.setdefault(result.series_instance_uid, None)

    def released(self, assoc: Any) -> int:
        """A-RELEASE: the association's series are complete; returns how many were signalled."""
        with self._lock:
            series = list(self._open.pop(assoc, {}))
        if not series:
            return 0
        try:
            signalled = self._repo.signal_series_complete(series)
        except DatabaseError as exc:
            # Not lost: the series still complete after their quiet period.
            log.warning(
                "completion signal of %d series not recorded (quiet period applies): %s", len(series), exc
            )
            return 0
        log.info(
            "association from %s released: %d of %d series complete (%s)",
            _calling_ae(assoc),
            signalled,
            len(series),
            ", ".join(series[:3]) + (" ..." if len(series) > 3 else ""),
        )
        if signalled and self.on_signalled is not None:
            self.on_signalled()
        return signalled

    def dropped(self, assoc: Any) -> None:
        """A-ABORT: no signal; the series complete by their quiet period."""
        with self._lock:
            self._open.pop(assoc, None)


def _calling_ae(assoc: Any) -> str:
    try:
        return str(assoc.requestor.ae_title).strip()
    except AttributeError:
        return "?"


def signalling_titles(peers: Iterable[AllowedPeer]) -> frozenset[str]:
    """The AE titles whose every allow-list entry sets `series_complete_on_release`: entries that
    disagree give no signal (the quiet period is the safe side). Both receivers use this one rule."""
    titles: dict[str, bool] = {}
    for peer in peers:
        titles[peer.ae_title] = titles.get(peer.ae_title, True) and peer.series_complete_on_release
    return frozenset(title for title, on in titles.items() if on)
