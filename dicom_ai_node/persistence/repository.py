"""Received instances, their series (completion state), and the result objects made from them.

Every write is one short transaction; the ones that several receivers or sweeps may run at once are
single guarded statements (``ON CONFLICT``, compare-and-set ``UPDATE ... WHERE``), so they are safe on
PostgreSQL under READ COMMITTED and on SQLite under ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa

from dicom_ai_node.persistence._common import Clock, dump_json, insert_for, load_json, utcnow
from dicom_ai_node.persistence.tables import instances, jobs, results, series

# SC: Secondary Capture key images with the overlay burned in (optional per destination).
ResultKind = Literal["SEG", "SR", "SC"]
_NOTE_MAX = 512


class SeriesStatus(enum.StrEnum):
    RECEIVING = "receiving"  # instances arriving; due for routing after its quiet period
    ROUTING = "routing"  # claimed by one completion sweep
    ROUTED = "routed"  # a rule matched and its jobs were enqueued
    UNMATCHED = "unmatched"  # no rule matched
    FAILED = "failed"  # routing itself failed (e.g. unreadable header)
    PURGED = "purged"  # finished long enough ago: retention removed its spool files and instance rows


# Series whose routing is over; retention may purge them once their jobs have finished too.
FINISHED_SERIES = (SeriesStatus.ROUTED, SeriesStatus.UNMATCHED, SeriesStatus.FAILED)
# Job states that still need the series' files (a FAILED job waits for its retry).
_ACTIVE_JOB_STATES = ("queued", "running", "failed")


@dataclass(frozen=True)
class InstanceRecord:
    """One instance just written to the spool, as the receive edge reports it.

    `header` holds the few non-PHI attributes rules match on (SliceThickness, ImagesInAcquisition, Rows,
    Columns, ...); values must be JSON-serialisable (sequences become lists, other objects text). The
    series-level fields are taken from the first instance of a series.
    """

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    spool_path: str
    size_bytes: int
    calling_ae: str = ""
    modality: str = ""
    body_part_examined: str = ""
    series_description: str = ""
    header: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InstanceRow:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    spool_path: str
    size_bytes: int
    calling_ae: str
    received_at: datetime


@dataclass(frozen=True)
class SeriesRow:
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    body_part_examined: str
    series_description: str
    sop_class_uid: str
    calling_ae: str
    instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    status: SeriesStatus
    generation: int
    routing_started_at: datetime | None
    routed_at: datetime | None
    route_note: str
    header: dict[str, Any]
    # The sender signalled the series complete as of this last_received_at (route/completion.py).
    complete_signalled_at: datetime | None = None

    @property
    def complete_signalled(self) -> bool:
        """The sender's completion signal still holds: no instance arrived after it."""
        return self.complete_signalled_at is not None and self.complete_signalled_at == self.last_received_at


@dataclass(frozen=True)
class ResultRow:
    id: int
    job_id: int
    source_series_instance_uid: str
    kind: ResultKind
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    spool_path: str
    created_at: datetime


class SeriesRepository:
    """Instances, series and results; the only writer of those tables."""

    def __init__(self, engine: sa.Engine, clock: Clock = utcnow) -> None:
        self._engine = engine
        self._clock = clock

    # -- receive -----------------------------------------------------------------------------------

    def record_instance(self, rec: InstanceRecord, now: datetime | None = None) -> bool:
        """Store one received instance and update its series, in one durable transaction.

        Returns False (and changes nothing) when the SOP Instance UID is already stored: duplicates are
        kept once, as PACS do, and the caller may drop its spool file. An instance arriving after its
        series left 'receiving' sets it back to 'receiving' with generation + 1 (a late instance).
        """
        now = now or self._clock()
        upsert_series, insert_instance = self._record_statements(rec, now)
        with self._engine.connect() as conn, conn.begin() as tx:
            # Series first: the instance row references it, and on PostgreSQL the series row lock
            # serialises concurrent instances of one series.
            conn.execute(upsert_series)
            if conn.execute(insert_instance).scalar_one_or_none() is None:
                tx.rollback()  # duplicate SOP Instance UID: undo the series update too
                return False
        return True

    def record_instances(self, recs: Sequence[InstanceRecord], now: datetime | None = None) -> list[bool]:
        """Several received instances in one durable transaction (group commit: the native receive edge's
        landing indexer, receive/landing.py); per record, whether it was new (as `record_instance`).

        One series upsert per series (its instance count up by its new instances) and one insert for all
        the new instances; an instance stored already (or twice in `recs`) changes nothing. Should another
        process store one of them meanwhile (PostgreSQL, several receivers), the whole batch is redone
        one savepoint per instance.
        """
        now = now or self._clock()
        with self._engine.connect() as conn, conn.begin() as tx:
            uids = [rec.sop_instance_uid for rec in recs]
            stored = set(
                conn.execute(
                    sa.select(instances.c.sop_instance_uid).where(instances.c.sop_instance_uid.in_(uids))
                ).scalars()
            )
            added: list[bool] = []
            by_series: dict[str, list[InstanceRecord]] = {}
            for rec in recs:
                is_new = rec.sop_instance_uid not in stored
                stored.add(rec.sop_instance_uid)
                added.append(is_new)
                if is_new:
                    by_series.setdefault(rec.series_instance_uid, []).append(rec)
            new = [rec for group in by_series.values() for rec in group]
            if not new:
                return added
            for group in by_series.values():
                upsert_series, _ = self._record_statements(group[0], now, count=len(group))
                conn.execute(upsert_series)
            # executemany: one statement, compiled once (SQLAlchemy's "insertmanyvalues" batches the rows).
            insert = (
                insert_for(self._engine, instances)
                .on_conflict_do_nothing(index_elements=[instances.c.sop_instance_uid])
                .returning(instances.c.sop_instance_uid)
            )
            inserted = conn.execute(insert, [_instance_values(rec, now) for rec in new]).scalars().all()
            if len(inserted) == len(new):
                return added
            tx.rollback()
        return self._record_each(recs, now)

    def _record_each(self, recs: Sequence[InstanceRecord], now: datetime) -> list[bool]:
        """`record_instances` one savepoint per instance (a duplicate rolls back its own series update)."""
        added: list[bool] = []
        with self._engine.connect() as conn, conn.begin():
            for rec in recs:
                upsert_series, insert_instance = self._record_statements(rec, now)
                savepoint = conn.begin_nested()
                conn.execute(upsert_series)
                is_new = conn.execute(insert_instance).scalar_one_or_none() is not None
                if is_new:
                    savepoint.commit()
                else:
                    savepoint.rollback()
                added.append(is_new)
        return added

    def _record_statements(self, rec: InstanceRecord, now: datetime, count: int = 1) -> tuple[Any, Any]:
        """The series upsert (for `count` new instances of its series) and the instance insert (returning
        its id, none for a duplicate) of `rec`."""
        new_series = insert_for(self._engine, series).values(
            series_instance_uid=rec.series_instance_uid,
            study_instance_uid=rec.study_instance_uid,
            modality=rec.modality,
            body_part_examined=rec.body_part_examined,
            series_description=rec.series_description,
            sop_class_uid=rec.sop_class_uid,
            calling_ae=rec.calling_ae,
            instance_count=count,
            first_received_at=now,
            last_received_at=now,
            status=SeriesStatus.RECEIVING.value,
            generation=1,
            route_note="",
            header_json=dump_json(rec.header),
        )
        # SET expressions see the row as it was before the update, on both engines.
        upsert_series = new_series.on_conflict_do_update(
            index_elements=[series.c.series_instance_uid],
            set_={
                "instance_count": series.c.instance_count + count,
                "last_received_at": new_series.excluded.last_received_at,
                "generation": sa.case(
                    (series.c.status == SeriesStatus.RECEIVING.value, series.c.generation),
                    else_=series.c.generation + 1,
                ),
                "status": SeriesStatus.RECEIVING.value,
                "routing_started_at": None,
            },
        )
        insert_instance = (
            insert_for(self._engine, instances)
            .values(**_instance_values(rec, now))
            .on_conflict_do_nothing(index_elements=[instances.c.sop_instance_uid])
            .returning(instances.c.id)
        )
        return upsert_series, insert_instance

    # -- completion sweep --------------------------------------------------------------------------

    def due_series(self, older_than: datetime, limit: int = 100) -> list[SeriesRow]:
        """Series still 'receiving' whose last instance arrived at or before `older_than`."""
        stmt = (
            sa.select(series)
            .where(
                series.c.status == SeriesStatus.RECEIVING.value,
                series.c.last_received_at <= older_than,
            )
            .order_by(series.c.last_received_at, series.c.series_instance_uid)
            .limit(limit)
        )
        return self._series_rows(stmt)

    def signal_series_complete(self, series_instance_uids: list[str]) -> int:
        """The sender says these series are complete as they are now (it released the association that
        carried them): record it, durably, for the completion sweep of any node process. Returns how many
        series it applies to (those still receiving or being routed).

        The signal is the series' current last_received_at, copied in one statement: an instance arriving
        later moves last_received_at on, which voids the signal without touching this column again.
        """
        count = 0
        with self._engine.begin() as conn:
            for start in range(0, len(series_instance_uids), 500):
                stmt = (
                    sa.update(series)
                    .where(
                        series.c.series_instance_uid.in_(series_instance_uids[start : start + 500]),
                        series.c.status.in_([SeriesStatus.RECEIVING.value, SeriesStatus.ROUTING.value]),
                    )
                    .values(complete_signalled_at=series.c.last_received_at)
                )
                count += conn.execute(stmt).rowcount
        return count

    def signalled_series(self, limit: int = 100) -> list[SeriesRow]:
        """Series still 'receiving' whose sender's completion signal holds (no instance since), oldest
        first: due for routing now, whatever their quiet period."""
        stmt = (
            sa.select(series)
            .where(
                series.c.status == SeriesStatus.RECEIVING.value,
                series.c.complete_signalled_at == series.c.last_received_at,
            )
            .order_by(series.c.last_received_at, series.c.series_instance_uid)
            .limit(limit)
        )
        return self._series_rows(stmt)

    def claim_series_for_routing(
        self, series_instance_uid: str, generation: int, last_received_at: datetime
    ) -> bool:
        """Compare-and-set receiving -> routing, only if no instance arrived since the caller looked.

        Exactly one of several concurrent sweeps gets True; a series that received an instance in the
        meantime (new last_received_at or generation) is left for a later sweep.
        """
        stmt = (
            sa.update(series)
            .where(
                series.c.series_instance_uid == series_instance_uid,
                series.c.status == SeriesStatus.RECEIVING.value,
                series.c.generation == generation,
                series.c.last_received_at == last_received_at,
            )
            .values(status=SeriesStatus.ROUTING.value, routing_started_at=self._clock())
        )
        return self._update_one(stmt)

    def mark_series(
        self,
        series_instance_uid: str,
        status: SeriesStatus | str,
        note: str = "",
        *,
        generation: int | None = None,
    ) -> bool:
        """Set the series status (routed_at too for routed/unmatched); `note` must hold no PHI.

        Pass the `generation` that was routed: if a late instance arrived meanwhile (generation moved on),
        nothing changes and False is returned, so the late instance is not hidden behind 'routed'.
        """
        status = SeriesStatus(status)
        values: dict[str, Any] = {"status": status.value, "route_note": note[:_NOTE_MAX]}
        if status in (SeriesStatus.ROUTED, SeriesStatus.UNMATCHED):
            values["routed_at"] = self._clock()
        stmt = sa.update(series).where(series.c.series_instance_uid == series_instance_uid)
        if generation is not None:
            stmt = stmt.where(series.c.generation == generation)
        return self._update_one(stmt.values(**values))

    def requeue_stalled_routing(self, older_than: datetime) -> int:
        """Put series stuck in 'routing' since before `older_than` (a sweep died) back to 'receiving'.

        The generation is kept, so jobs enqueued with generation-based dedupe keys are not duplicated.
        """
        stmt = (
            sa.update(series)
            .where(
                series.c.status == SeriesStatus.ROUTING.value,
                series.c.routing_started_at <= older_than,
            )
            .values(status=SeriesStatus.RECEIVING.value, routing_started_at=None)
        )
        with self._engine.begin() as conn:
            return conn.execute(stmt).rowcount

    # -- retention ---------------------------------------------------------------------------------

    def purgeable_series(
        self, older_than: datetime, dead_older_than: datetime, limit: int = 100
    ) -> list[SeriesRow]:
        """Finished series whose last instance arrived before `older_than` and whose jobs have all
        finished; a series with a dead-letter job only once it is older than `dead_older_than` (an admin
        may still replay the job). Oldest first."""
        # Jobs name their series in the JSON payload (dump_json: sorted keys, ": " separator); UIDs hold
        # only digits and dots, so they are safe inside a LIKE pattern.
        names_series = jobs.c.payload.like(
            sa.literal('%"series_instance_uid": "') + series.c.series_instance_uid + sa.literal('"%')
        )
        active_job = sa.exists().where(names_series, jobs.c.status.in_(_ACTIVE_JOB_STATES))
        dead_job = sa.exists().where(names_series, jobs.c.status == "dead")
        stmt = (
            sa.select(series)
            .where(
                series.c.status.in_([s.value for s in FINISHED_SERIES]),
                series.c.last_received_at < older_than,
                ~active_job,
                sa.or_(series.c.last_received_at < dead_older_than, ~dead_job),
            )
            .order_by(series.c.last_received_at, series.c.series_instance_uid)
            .limit(limit)
        )
        return self._series_rows(stmt)

    def purge_series(self, row: SeriesRow, now: datetime | None = None) -> list[str] | None:
        """Mark `row` purged and delete its instance rows, in one transaction; returns the spool paths
        (instances and results) the caller must now delete, or None when the series changed since it
        was listed (a late instance re-opened it): nothing is touched then.

        Result rows stay: their UIDs keep re-runs idempotent and revisions chained. Instance rows go, so
        the series can be sent again and is then received as new.
        """
        now = now or self._clock()
        claim = (
            sa.update(series)
            .where(
                series.c.series_instance_uid == row.series_instance_uid,
                series.c.status == row.status.value,
                series.c.generation == row.generation,
                series.c.last_received_at == row.last_received_at,
            )
            .values(
                status=SeriesStatus.PURGED.value,
                instance_count=0,
                route_note=f"images removed by retention on {now:%Y-%m-%d} (was {row.status.value})",
            )
        )
        with self._engine.begin() as conn:
            if conn.execute(claim).rowcount != 1:
                return None
            # After the compare-and-set: on PostgreSQL the series row is now locked, so an instance of
            # this series arriving meanwhile waits for this commit and then re-opens the series afresh.
            found = conn.execute(
                sa.select(instances.c.id, instances.c.spool_path).where(
                    instances.c.series_instance_uid == row.series_instance_uid
                )
            ).all()
            ids = [r.id for r in found]
            for start in range(0, len(ids), 500):
                conn.execute(sa.delete(instances).where(instances.c.id.in_(ids[start : start + 500])))
            result_paths = conn.execute(
                sa.select(results.c.spool_path).where(
                    results.c.source_series_instance_uid == row.series_instance_uid
                )
            ).scalars()
            return [r.spool_path for r in found] + [p for p in result_paths if p]

    # -- reads -------------------------------------------------------------------------------------

    def get_series(self, series_instance_uid: str) -> SeriesRow | None:
        rows = self._series_rows(sa.select(series).where(series.c.series_instance_uid == series_instance_uid))
        return rows[0] if rows else None

    def list_series(
        self,
        limit: int = 100,
        status: SeriesStatus | str | None = None,
        *,
        modality: str | None = None,
        offset: int = 0,
    ) -> list[SeriesRow]:
        """Most recently active series first."""
        stmt = sa.select(series).where(*_series_filter(status, modality))
        stmt = stmt.order_by(series.c.last_received_at.desc(), series.c.series_instance_uid)
        return self._series_rows(stmt.limit(limit).offset(offset))

    def count_series(self, status: SeriesStatus | str | None = None, *, modality: str | None = None) -> int:
        stmt = sa.select(sa.func.count()).select_from(series).where(*_series_filter(status, modality))
        with self._engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def instances_of_series(self, series_instance_uid: str) -> list[InstanceRow]:
        stmt = (
            sa.select(instances)
            .where(instances.c.series_instance_uid == series_instance_uid)
            .order_by(instances.c.received_at, instances.c.id)
        )
        with self._engine.connect() as conn:
            return [InstanceRow(**row) for row in conn.execute(stmt).mappings()]

    def instance_spool_paths(self) -> set[str]:
        """The spool path of every instance row (for the orphan sweep at start, Spool.remove_orphans)."""
        with self._engine.connect() as conn:
            return set(conn.execute(sa.select(instances.c.spool_path)).scalars())

    def has_instance_file(self, spool_path: str) -> bool:
        """Whether an instance row names this spool path now."""
        stmt = sa.select(instances.c.id).where(instances.c.spool_path == spool_path).limit(1)
        with self._engine.connect() as conn:
            return conn.execute(stmt).first() is not None

    # -- results -----------------------------------------------------------------------------------

    def add_result(
        self,
        *,
        job_id: int,
        source_series_instance_uid: str,
        kind: ResultKind,
        sop_class_uid: str,
        sop_instance_uid: str,
        series_instance_uid: str,
        study_instance_uid: str,
        spool_path: str,
        now: datetime | None = None,
    ) -> int:
        """Record a result object and return its id; idempotent on SOP Instance UID (a re-run updates it)."""
        if kind not in ("SEG", "SR", "SC"):
            raise ValueError(f"result kind must be 'SEG', 'SR' or 'SC', not {kind!r}")
        values: dict[str, Any] = {
            "job_id": job_id,
            "source_series_instance_uid": source_series_instance_uid,
            "kind": kind,
            "sop_class_uid": sop_class_uid,
            "series_instance_uid": series_instance_uid,
            "study_instance_uid": study_instance_uid,
            "spool_path": spool_path,
        }
        stmt = (
            insert_for(self._engine, results)
            .values(sop_instance_uid=sop_instance_uid, created_at=now or self._clock(), **values)
            .on_conflict_do_update(index_elements=[results.c.sop_instance_uid], set_=values)
            .returning(results.c.id)
        )
        with self._engine.begin() as conn:
            return int(conn.execute(stmt).scalar_one())

    def results_of_job(self, job_id: int) -> list[ResultRow]:
        return self._result_rows(sa.select(results).where(results.c.job_id == job_id))

    def results_of_series(self, source_series_instance_uid: str) -> list[ResultRow]:
        """Results made from a source series (all jobs, all generations), oldest first."""
        return self._result_rows(
            sa.select(results).where(results.c.source_series_instance_uid == source_series_instance_uid)
        )

    # -- helpers -----------------------------------------------------------------------------------

    def _update_one(self, stmt: sa.Update) -> bool:
        with self._engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def _series_rows(self, stmt: sa.Select[Any]) -> list[SeriesRow]:
        with self._engine.connect() as conn:
            return [_series_row(row) for row in conn.execute(stmt).mappings()]

    def _result_rows(self, stmt: sa.Select[Any]) -> list[ResultRow]:
        with self._engine.connect() as conn:
            rows = conn.execute(stmt.order_by(results.c.id)).mappings()
            return [ResultRow(**row) for row in rows]


def _instance_values(rec: InstanceRecord, now: datetime) -> dict[str, Any]:
    return {
        "sop_instance_uid": rec.sop_instance_uid,
        "sop_class_uid": rec.sop_class_uid,
        "series_instance_uid": rec.series_instance_uid,
        "study_instance_uid": rec.study_instance_uid,
        "transfer_syntax_uid": rec.transfer_syntax_uid,
        "spool_path": rec.spool_path,
        "size_bytes": rec.size_bytes,
        "calling_ae": rec.calling_ae,
        "received_at": now,
    }


def _series_filter(status: SeriesStatus | str | None, modality: str | None) -> list[sa.ColumnElement[bool]]:
    where: list[sa.ColumnElement[bool]] = []
    if status is not None:
        where.append(series.c.status == SeriesStatus(status).value)
    if modality is not None:
        where.append(series.c.modality == modality)
    return where


def _series_row(row: sa.RowMapping) -> SeriesRow:
    values = dict(row)
    header = load_json(values.pop("header_json"))
    values["status"] = SeriesStatus(values["status"])
    return SeriesRow(header=header, **values)
