"""The one SQLAlchemy schema shared by SQLite and PostgreSQL.

Timestamps are timezone-aware UTC datetimes in Python. PostgreSQL stores them as ``timestamptz``; SQLite
stores naive UTC text in SQLAlchemy's fixed-width format (``YYYY-MM-DD HH:MM:SS.ffffff``), so comparisons
in SQL stay correct as text comparisons and values round-trip to the microsecond on both engines.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on both engines; naive datetimes are refused (ambiguous)."""

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(sa.DateTime(timezone=True))
        return dialect.type_descriptor(sa.DateTime(timezone=False))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime given; use a timezone-aware UTC datetime")
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# One row per series; status moves receiving -> routing -> routed | unmatched | failed, and back to
# receiving (generation + 1) when a late instance arrives.
series = sa.Table(
    "series",
    metadata,
    sa.Column("series_instance_uid", sa.String(64), primary_key=True),
    sa.Column("study_instance_uid", sa.String(64), nullable=False, index=True),
    sa.Column("modality", sa.String(16), nullable=False, server_default=""),
    sa.Column("body_part_examined", sa.String(64), nullable=False, server_default=""),
    sa.Column("series_description", sa.String(128), nullable=False, server_default=""),
    sa.Column("sop_class_uid", sa.String(64), nullable=False, server_default=""),
    sa.Column("calling_ae", sa.String(16), nullable=False, server_default=""),
    sa.Column("instance_count", sa.Integer, nullable=False),
    sa.Column("first_received_at", UtcDateTime, nullable=False),
    sa.Column("last_received_at", UtcDateTime, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    # Set when a sweep claims the series, so a sweep that died mid-routing can be detected and retried.
    sa.Column("routing_started_at", UtcDateTime, nullable=True),
    sa.Column("routed_at", UtcDateTime, nullable=True),
    sa.Column("route_note", sa.String(512), nullable=False, server_default=""),
    # JSON object of the few non-PHI header attributes rules match on (SliceThickness, Rows, ...).
    sa.Column("header_json", sa.Text, nullable=False, server_default="{}"),
    sa.Index("ix_series_status_last_received_at", "status", "last_received_at"),
)

instances = sa.Table(
    "instances",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
    sa.Column("sop_class_uid", sa.String(64), nullable=False),
    sa.Column(
        "series_instance_uid",
        sa.String(64),
        sa.ForeignKey("series.series_instance_uid"),
        nullable=False,
        index=True,
    ),
    sa.Column("study_instance_uid", sa.String(64), nullable=False),
    sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
    # Relative to the spool root; the file name comes from a hash/UUID, never from DICOM values.
    sa.Column("spool_path", sa.String(512), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("calling_ae", sa.String(16), nullable=False, server_default=""),
    sa.Column("received_at", UtcDateTime, nullable=False),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("scheduled_at", UtcDateTime, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=True),
    sa.Column("finished_at", UtcDateTime, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("dedupe_key", sa.String(255), nullable=True, unique=True),
    sa.Column("lock_key", sa.String(255), nullable=True, index=True),
    sa.Column("worker_id", sa.String(128), nullable=True),
    sa.Column("heartbeat_at", UtcDateTime, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("result", sa.Text, nullable=True),
    sa.Index("ix_jobs_status_kind_scheduled_at", "status", "kind", "scheduled_at"),
    # The database itself guarantees at most one running job per lock key (e.g. per study): a claim that
    # races another one for the same key fails with an IntegrityError instead of running both.
    sa.Index(
        "uq_jobs_running_lock_key",
        "lock_key",
        unique=True,
        sqlite_where=sa.text("status = 'running'"),
        postgresql_where=sa.text("status = 'running'"),
    ),
)

results = sa.Table(
    "results",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # No foreign key: results are kept when finished jobs are purged.
    sa.Column("job_id", sa.Integer, nullable=False, index=True),
    sa.Column("source_series_instance_uid", sa.String(64), nullable=False, index=True),
    sa.Column("kind", sa.String(8), nullable=False),
    sa.Column("sop_class_uid", sa.String(64), nullable=False),
    sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
    sa.Column("series_instance_uid", sa.String(64), nullable=False),
    sa.Column("study_instance_uid", sa.String(64), nullable=False),
    sa.Column("spool_path", sa.String(512), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
)
