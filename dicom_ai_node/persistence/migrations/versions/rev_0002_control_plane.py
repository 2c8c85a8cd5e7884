"""control plane: users, sessions, API tokens, append-only audit, versioned rules; job filter columns

The four new jobs columns are copied from each job's JSON payload (a Python loop in batches, the same on
both engines), so the admin page can filter old jobs as well as new ones.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

from dicom_ai_node.persistence.tables import UtcDateTime

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

# Job columns filled from the payload key of the same name.
_JOB_COLUMNS = ("series_instance_uid", "rule_id", "model", "destination")
_COLUMN_CHARS = 64
_BATCH = 500
_APPEND_ONLY = "audit_events is append-only"


def upgrade() -> None:
    _create_account_tables()
    _create_audit_table()
    _create_rule_tables()
    for name in _JOB_COLUMNS:
        op.add_column("jobs", sa.Column(name, sa.String(_COLUMN_CHARS), nullable=True))
    op.create_index("ix_jobs_series_instance_uid", "jobs", ["series_instance_uid"])
    _backfill_job_columns()
    _add_append_only_triggers()


def downgrade() -> None:
    _drop_append_only_triggers()
    op.drop_index("ix_jobs_series_instance_uid", table_name="jobs")
    # SQLite >= 3.35 (the node's minimum) drops columns in place; no table copy is needed.
    with op.batch_alter_table("jobs", recreate="never") as batch:
        for name in reversed(_JOB_COLUMNS):
            batch.drop_column(name)
    for table in ("rule_versions", "rules", "audit_events", "api_tokens", "sessions", "users"):
        op.drop_table(table)


def _create_account_tables() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=True),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.Column("last_login_at", UtcDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("username", name="uq_users_username"),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("source", sa.String(64), nullable=False, server_default=""),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("last_seen_at", UtcDateTime, nullable=False),
        sa.Column("expires_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_sessions_user_id_users", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_sessions_user_id", "sessions", ["user_id"])
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=True),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("token_prefix", sa.String(16), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("expires_at", UtcDateTime, nullable=True),
        sa.Column("last_used_at", UtcDateTime, nullable=True),
        sa.Column("revoked_at", UtcDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_api_tokens_user_id_users", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])


def _create_audit_table() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=True),
        sa.Column("at", UtcDateTime, nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("source", sa.String(64), nullable=False, server_default=""),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255), nullable=False, server_default=""),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text, nullable=False, server_default="{}"),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_action_at", "audit_events", ["action", "at"])


def _create_rule_tables() -> None:
    op.create_table(
        "rules",
        sa.Column("rule_id", sa.String(64), nullable=False),
        sa.Column("current_version", sa.Integer, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("rule_id", name="pk_rules"),
    )
    op.create_table(
        "rule_versions",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=True),
        sa.Column("rule_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("change", sa.String(16), nullable=False),
        sa.Column("comment", sa.Text, nullable=False, server_default=""),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rule_versions"),
        sa.UniqueConstraint("rule_id", "version", name="uq_rule_versions_rule_id_version"),
    )


def _column_values(payload_text: str | None) -> dict[str, str | None]:
    try:
        payload: Any = json.loads(payload_text or "{}")
    except ValueError:
        payload = {}
    if not isinstance(payload, dict):
        payload = {}
    values: dict[str, str | None] = {}
    for name in _JOB_COLUMNS:
        value = payload.get(name)
        values[name] = None if value is None or isinstance(value, dict | list) else str(value)[:_COLUMN_CHARS]
    return values


def _backfill_job_columns() -> None:
    # A table of its own (not tables.jobs): this revision must keep working when tables.py moves on.
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.Integer),
        sa.column("payload", sa.Text),
        *(sa.column(name, sa.String(_COLUMN_CHARS)) for name in _JOB_COLUMNS),
    )
    conn = op.get_bind()
    update = (
        sa.update(jobs)
        .where(jobs.c.id == sa.bindparam("job_id"))
        .values({name: sa.bindparam(f"new_{name}") for name in _JOB_COLUMNS})
    )
    last_id = 0
    while True:
        rows = conn.execute(
            sa.select(jobs.c.id, jobs.c.payload).where(jobs.c.id > last_id).order_by(jobs.c.id).limit(_BATCH)
        ).all()
        if not rows:
            return
        params = []
        for row in rows:
            values = _column_values(row.payload)
            if any(v is not None for v in values.values()):
                params.append({"job_id": row.id, **{f"new_{k}": v for k, v in values.items()}})
        if params:
            conn.execute(update, params)
        last_id = rows[-1].id


def _add_append_only_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN RAISE EXCEPTION '{_APPEND_ONLY}'; END $$"
        )
        op.execute(
            "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()"
        )
        return
    for event in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER audit_events_no_{event.lower()} BEFORE {event} ON audit_events "
            f"BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END"
        )


def _drop_append_only_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS audit_events_append_only()")
        return
    for event in ("update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS audit_events_no_{event}")
