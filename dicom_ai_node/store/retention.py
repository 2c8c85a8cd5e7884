"""Retention: finished series leave the spool after `retention.days` (the PACS is the archive).

A series is purged when its routing is over, its last instance arrived more than `days` ago and none of
its jobs still needs its files (queued, running or waiting for a retry); one with a dead-letter job is
kept `dead_days`, so an admin can still replay it. The database step comes first and is a
compare-and-set on the series row: a late instance that re-opened the series wins, and nothing is
removed. Files are deleted after that commit; a crash in between leaves files no row names (disk, not
data, is lost), never a row that names a deleted file of an unfinished job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from dicom_ai_node.config import RetentionSettings
from dicom_ai_node.domain.clock import Clock, utcnow
from dicom_ai_node.persistence.repository import SeriesRepository
from dicom_ai_node.store.spool import Spool

log = logging.getLogger(__name__)

_BATCH = 100
# One run stops after this many series and leaves the rest to the next run, so a first run over a
# long backlog cannot hold the scheduler thread for long.
_MAX_SERIES_PER_RUN = 2000


@dataclass(frozen=True)
class RetentionReport:
    series: int
    files: int
    bytes: int


class RetentionSweep:
    def __init__(
        self, repo: SeriesRepository, spool: Spool, settings: RetentionSettings, clock: Clock = utcnow
    ) -> None:
        self._repo = repo
        self._spool = spool
        self._settings = settings
        self._clock = clock

    def run_once(self) -> RetentionReport:
        """Purge what is due now; a no-op when `retention.days` is 0."""
        if not self._settings.days:
            return RetentionReport(0, 0, 0)
        now = self._clock()
        older_than = now - timedelta(days=self._settings.days)
        dead_older_than = now - timedelta(days=self._settings.dead_days)
        purged = files = size = 0
        while purged < _MAX_SERIES_PER_RUN:
            batch = self._repo.purgeable_series(older_than, dead_older_than, limit=_BATCH)
            if not batch:
                break
            progressed = False
            for row in batch:
                paths = self._repo.purge_series(row, now=now)
                if paths is None:
                    continue  # re-opened by a late instance since it was listed: kept
                progressed = True
                purged += 1
                for relative in paths:
                    path = self._spool.path(relative)
                    try:
                        size += path.stat().st_size
                        path.unlink()
                        files += 1
                    except FileNotFoundError:
                        pass  # a previous run removed it before a crash, or it never existed
                log.info(
                    "retention: series %s (%s) purged, %d spool files",
                    row.series_instance_uid,
                    row.modality,
                    len(paths),
                )
            if not progressed:
                break
        if purged:
            log.info("retention: %d series purged, %d files, %.1f MB freed", purged, files, size / 1e6)
        return RetentionReport(purged, files, size)
