"""Landed files of the native receive edge become instance rows, in batches, and survive any crash.

The native edge (native/ainode-storescp, supervised by receive/native.py) answers a C-STORE with Success
once the instance's file is durable in the spool's landing dir, `landing/<32 hex>.dcm` (fsync file,
rename, fsync dir): that file is the record. This module turns landed files into rows:

    landing/N.dcm  -- read header, receive checks (ingest.check_instance) -->
    link as instances/NN/N.dcm (the spool's own layout; flock held, so Spool.remove_orphans leaves it)
    -- one transaction for the whole batch (SeriesRepository.record_instances) -->
    fsync the shard dirs -- unlink landing/N.dcm

Every step is keyed by N and idempotent, so wherever a crash (or kill -9) falls, the landing file is
still there until its row is committed and its link durable, and `recover` at start-up finishes the job:
a landed file without a row gets its row; one whose row exists only loses its landing name. A file the
native edge accepted but these checks refuse (they are the same checks, so only a reader difference
can cause it) is never dropped: it moves to `landing-refused/` with an error in the log.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dicom_ai_node.errors import DatabaseError
from dicom_ai_node.persistence.repository import InstanceRecord, SeriesRepository
from dicom_ai_node.receive.header import UnreadableDataset, read_header
from dicom_ai_node.receive.ingest import Refused, check_instance, instance_record
from dicom_ai_node.store.spool import INSTANCES, Spool

log = logging.getLogger(__name__)

LANDING = "landing"
LANDING_REFUSED = "landing-refused"
# One transaction indexes at most this many files (a few tens of ms of work on SQLite) ...
BATCH_MAX = 256
# ... gathered for at most this long after the first one arrived.
BATCH_WAIT_S = 0.05
# Without events (a lost line, another receiver on a shared spool), the landing dir is rescanned this often.
RESCAN_S = 2.0
_NAME_LENGTH = 32
_KNOWN_SERIES_MAX = 10_000


@dataclass(frozen=True)
class BatchResult:
    indexed: int = 0
    duplicates: int = 0
    refused: int = 0
    # Series of the files indexed (new or duplicate): for the completion signal of a released association.
    series_instance_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class LandedInfo:
    """What the native edge's checks read from a landed file (its "store" event)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str

    def record(self, spool_path: str, size_bytes: int) -> InstanceRecord:
        """The row of an instance of a series already recorded (no header attributes needed)."""
        return InstanceRecord(
            sop_instance_uid=self.sop_instance_uid,
            sop_class_uid=self.sop_class_uid,
            series_instance_uid=self.series_instance_uid,
            study_instance_uid=self.study_instance_uid,
            transfer_syntax_uid=self.transfer_syntax_uid,
            spool_path=spool_path,
            size_bytes=size_bytes,
            calling_ae=self.calling_ae,
        )


@dataclass
class _Item:
    name: str
    landed: Path
    fd: int
    relative: str
    record: InstanceRecord


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def landing_names(directory: Path) -> list[str]:
    """Names (without .dcm) of the landed files in `directory`, oldest first by name order of arrival
    being unknown: sorted, so a batch is deterministic."""
    names = []
    with os.scandir(directory) as entries:
        for entry in entries:
            stem, dot, ext = entry.name.partition(".")
            if dot and ext == "dcm" and len(stem) == _NAME_LENGTH and entry.is_file(follow_symlinks=False):
                names.append(stem)
    return sorted(names)


class LandingIndexer:
    """Indexes landed files: `recover()` once at start (before the native edge runs), then `start()` a
    thread that indexes the names `enqueue` hands it (and rescans the dir every RESCAN_S)."""

    def __init__(
        self,
        spool: Spool,
        repo: SeriesRepository,
        *,
        batch_max: int = BATCH_MAX,
        batch_wait_s: float = BATCH_WAIT_S,
        on_batch: Callable[[BatchResult], None] | None = None,
    ) -> None:
        self.spool = spool
        self.repo = repo
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        self.on_batch = on_batch
        self.directory = spool.root / LANDING
        self.refused_directory = spool.root / LANDING_REFUSED
        for directory in (self.directory, self.refused_directory):
            directory.mkdir(parents=True, exist_ok=True)
        # The landing dir's own entry must be durable before the first file in it is acknowledged.
        _fsync_dir(spool.root)
        self._queue: queue.Queue[str] = queue.Queue()
        self._pending: set[str] = set()
        # What the native edge read while checking each landed file (its "store" event), by name.
        self._landed: dict[str, LandedInfo] = {}
        # Series this process has recorded (most recent last): their rows exist, so their next instances
        # need only their UIDs, not a second read of the file (the series row keeps its first header).
        self._known_series: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._indexed = threading.Condition(self._lock)
        self._durable_shards: set[Path] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the running indexer ----------------------------------------------------------------------------
    def enqueue(self, name: str, info: LandedInfo | None = None) -> None:
        """A file the native edge just landed (its "store" event, with what its checks read)."""
        with self._lock:
            if info is not None:
                self._landed[name] = info
            if name in self._pending:
                return
            self._pending.add(name)
        self._queue.put(name)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="landing-indexer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30) -> None:
        """Index what is queued (bounded by `timeout_s`), then stop; the rest waits for `recover`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None

    def wait_indexed(self, names: Iterable[str], timeout_s: float) -> bool:
        """Block until none of `names` is still in the landing dir (each has its row, or was refused)."""
        deadline = time.monotonic() + timeout_s
        waiting = [self.directory / f"{name}.dcm" for name in names]
        with self._indexed:
            while True:
                waiting = [path for path in waiting if path.exists()]
                left = deadline - time.monotonic()
                if not waiting or left <= 0:
                    return not waiting
                self._indexed.wait(min(left, 0.5))

    def _run(self) -> None:
        last_scan = time.monotonic()
        while True:
            stopping = self._stop.is_set()
            names = self._take(block=not stopping)
            if not names and time.monotonic() - last_scan >= RESCAN_S:
                last_scan = time.monotonic()
                for name in landing_names(self.directory):
                    self.enqueue(name)
                names = self._take(block=False)
            if not names:
                if stopping:
                    return
                continue
            try:
                self.index(names)
            except DatabaseError as exc:
                # Nothing is lost: the files stay landed; retried after a pause (and at the next start).
                log.error("cannot index %d landed instances (retrying): %s", len(names), exc)
                self._stop.wait(1.0)
                with self._lock:
                    self._pending.difference_update(names)
                for name in names:
                    self.enqueue(name)
                if stopping:
                    return
            except Exception:  # noqa: BLE001 - the indexer thread must survive a bug; files stay landed
                log.exception("indexing landed instances failed; they are retried at the next start")
                with self._lock:
                    self._pending.difference_update(names)

    def _take(self, block: bool) -> list[str]:
        names: list[str] = []
        try:
            names.append(self._queue.get(timeout=0.2) if block else self._queue.get_nowait())
        except queue.Empty:
            return names
        # Group commit: whatever arrived while the last batch was being indexed, and for BATCH_WAIT_S more,
        # goes into this one. The rows are off the acknowledgement path, so waiting costs the sender
        # nothing and saves the disk syncs (database and directories) that small batches would repeat.
        deadline = time.monotonic() + (self.batch_wait_s if block else 0)
        while len(names) < self.batch_max:
            try:
                names.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return names

    # -- indexing ---------------------------------------------------------------------------------------
    def recover(self) -> int:
        """Index every file in the landing dir now (start-up, before the native edge runs); returns how
        many got a new row."""
        names = landing_names(self.directory)
        indexed = 0
        for start in range(0, len(names), self.batch_max):
            indexed += self.index(names[start : start + self.batch_max]).indexed
        if names:
            log.info("recovered %d landed instances (%d new rows)", len(names), indexed)
        return indexed

    def index(self, names: list[str]) -> BatchResult:
        """Index the landed files `names` in one transaction; raises DatabaseError (files stay landed)."""
        items: list[_Item] = []
        refused = 0
        with self._lock:
            infos = {name: self._landed.pop(name, None) for name in names}
        batch_series: set[str] = set()
        try:
            for name in names:
                item, was_refused = self._prepare(name, infos[name], batch_series)
                refused += was_refused
                if item is not None:
                    items.append(item)
                    batch_series.add(item.record.series_instance_uid)
            if not items:
                return BatchResult(refused=refused)
            added = self.repo.record_instances([item.record for item in items])
            duplicates = 0
            for item, is_new in zip(items, added, strict=True):
                if not is_new and not self.repo.has_instance_file(item.relative):
                    # Stored before under another name: kept once, as the Python edge does.
                    duplicates += 1
                    self.spool.remove(item.relative)
                    log.info(
                        "duplicate SOP %s from %s kept once",
                        item.record.sop_instance_uid,
                        item.record.calling_ae,
                    )
            for shard in {(self.spool.root / item.relative).parent for item in items}:
                _fsync_dir(shard)
            for item in items:
                item.landed.unlink(missing_ok=True)
            series = tuple(dict.fromkeys(item.record.series_instance_uid for item in items))
            for uid in series:
                self._known_series[uid] = None
                self._known_series.move_to_end(uid)
            while len(self._known_series) > _KNOWN_SERIES_MAX:
                self._known_series.popitem(last=False)
            result = BatchResult(len(items) - duplicates, duplicates, refused, series)
        finally:
            for item in items:
                os.close(item.fd)  # releases the lock
            with self._indexed:
                self._pending.difference_update(names)
                self._indexed.notify_all()
        if self.on_batch is not None:
            self.on_batch(result)
        return result

    def _prepare(
        self, name: str, info: LandedInfo | None, batch_series: set[str]
    ) -> tuple[_Item | None, bool]:
        """Lock, check and link one landed file; (None, False) when it is gone or another indexer has it.

        The file is read again (header, receive checks) unless the native edge's event says what it
        holds and its series row exists (or is being made by this batch): that row keeps the header of
        its first instance, the others add only their UIDs (what `record_instance` does too)."""
        landed = self.directory / f"{name}.dcm"
        try:
            fd = os.open(landed, os.O_RDONLY)
        except FileNotFoundError:
            return None, False  # indexed already
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None, False  # another receiver's indexer on a shared spool holds it
        try:
            if not landed.exists():  # indexed by another process between open and lock
                os.close(fd)
                return None, False
            relative = f"{INSTANCES}/{name[:2]}/{name}.dcm"
            size = os.fstat(fd).st_size
            known = info is not None and (
                info.series_instance_uid in self._known_series or info.series_instance_uid in batch_series
            )
            if info is not None and known:
                record = info.record(relative, size)
            else:
                header = read_header(landed)
                check_instance(header, None)
                record = instance_record(header, relative, size, header.source_application_entity_title)
            self._link(landed, self.spool.root / relative)
        except (UnreadableDataset, Refused) as exc:
            os.close(fd)
            self._refuse(landed, getattr(exc, "status", 0), getattr(exc, "reason", str(exc)))
            return None, True
        except BaseException:
            os.close(fd)
            raise
        return _Item(name, landed, fd, relative, record), False

    def _link(self, landed: Path, target: Path) -> None:
        shard = target.parent
        if shard not in self._durable_shards:
            shard.mkdir(parents=True, exist_ok=True)
            _fsync_dir(shard.parent)  # the shard's entry, durable before a row names a file in it
            self._durable_shards.add(shard)
        try:
            os.link(landed, target)
        except FileExistsError:
            if not os.path.samefile(landed, target):  # never happens with random names: do not guess
                raise OSError(errno.EEXIST, f"{target} exists and is another file") from None

    def _refuse(self, landed: Path, status: int, reason: str) -> None:
        log.error(
            "landed file %s refused by the receive checks (0x%04X: %s): kept in %s, not indexed",
            landed.name,
            status,
            reason,
            LANDING_REFUSED,
        )
        os.replace(landed, self.refused_directory / landed.name)
