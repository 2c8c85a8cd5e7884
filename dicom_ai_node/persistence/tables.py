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
    # The sender said the series is complete (it released the association that carried it): the
    # last_received_at it was complete at. Equal to last_received_at: route now, without the quiet
    # period; any later instance moves last_received_at on, and the signal no longer holds.
    sa.Column("complete_signalled_at", UtcDateTime, nullable=True),
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
    # Copied from the payload at enqueue (no PHI) so the admin page can filter jobs without parsing JSON.
    sa.Column("series_instance_uid", sa.String(64), nullable=True, index=True),
    sa.Column("rule_id", sa.String(64), nullable=True),
    sa.Column("model", sa.String(64), nullable=True),
    sa.Column("destination", sa.String(64), nullable=True),
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

# -- control plane (admin issue): accounts, sessions, API tokens, audit, versioned routing rules ----------

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("username", sa.String(64), nullable=False, unique=True),
    # admin | operator | viewer (domain.auth.Role)
    sa.Column("role", sa.String(16), nullable=False),
    # argon2id PHC string; never a plain or fast hash.
    sa.Column("password_hash", sa.String(255), nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.Column("last_login_at", UtcDateTime, nullable=True),
)

# Browser sessions live in the database so every node process behind a load balancer knows them.
sessions = sa.Table(
    "sessions",
    metadata,
    # sha256 of the cookie value: a leaked database does not hand out live sessions.
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column(
        "user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    ),
    sa.Column("csrf_token", sa.String(64), nullable=False),
    sa.Column("source", sa.String(64), nullable=False, server_default=""),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("last_seen_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
)

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    ),
    sa.Column("name", sa.String(64), nullable=False),
    # A token acts with this role, never more than its user's.
    sa.Column("role", sa.String(16), nullable=False),
    # sha256 of the secret (a 256-bit random secret needs no slow hash); the secret is shown once.
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    # The first characters of the secret, so admins can tell tokens apart.
    sa.Column("token_prefix", sa.String(16), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=True),
    sa.Column("last_used_at", UtcDateTime, nullable=True),
    sa.Column("revoked_at", UtcDateTime, nullable=True),
)

# Append-only (triggers refuse UPDATE and DELETE on both engines; see the migration). No PHI: actors are
# user names, targets are rule ids, job ids, user names and UIDs.
audit_events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", UtcDateTime, nullable=False, index=True),
    sa.Column("actor", sa.String(64), nullable=False),
    # Client IP address, or "cli" for the command line.
    sa.Column("source", sa.String(64), nullable=False, server_default=""),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(255), nullable=False, server_default=""),
    # ok | denied | failed
    sa.Column("outcome", sa.String(16), nullable=False),
    # JSON object (e.g. a rule diff, a comment, a reason).
    sa.Column("detail", sa.Text, nullable=False, server_default="{}"),
    sa.Index("ix_audit_events_action_at", "action", "at"),
)

# The current state of each routing rule; its content is the rule_versions row at current_version.
rules = sa.Table(
    "rules",
    metadata,
    sa.Column("rule_id", sa.String(64), primary_key=True),
    sa.Column("current_version", sa.Integer, nullable=False),
    # A deleted rule keeps its history; saving the id again continues it.
    sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("updated_at", UtcDateTime, nullable=False),
)

# Every save of a rule, never changed afterwards: who, when, why, and the whole rule as it was.
rule_versions = sa.Table(
    "rule_versions",
    metadata,
    # Grows with every save anywhere: one cheap max(id) tells a node process its rule set is stale.
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rule_id", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    # The rule as JSON (domain.rules.Rule, with this version number).
    sa.Column("spec", sa.Text, nullable=False),
    # seed | create | update | rollback | delete | import
    sa.Column("change", sa.String(16), nullable=False),
    sa.Column("comment", sa.Text, nullable=False, server_default=""),
    sa.Column("created_by", sa.String(64), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.UniqueConstraint("rule_id", "version"),
)
