"""baseline: the schema as the node created it before migrations (series, instances, jobs, results)

Written by hand from tables.py as it was, with every constraint and index named as the naming convention
named them, so a database created by `metadata.create_all` of that version is exactly this revision and
is stamped 0001 instead of being rebuilt.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dicom_ai_node.persistence.tables import UtcDateTime

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "series",
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
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
        sa.Column("routing_started_at", UtcDateTime, nullable=True),
        sa.Column("routed_at", UtcDateTime, nullable=True),
        sa.Column("route_note", sa.String(512), nullable=False, server_default=""),
        sa.Column("header_json", sa.Text, nullable=False, server_default="{}"),
        sa.PrimaryKeyConstraint("series_instance_uid", name="pk_series"),
    )
    op.create_index("ix_series_study_instance_uid", "series", ["study_instance_uid"])
    op.create_index("ix_series_status_last_received_at", "series", ["status", "last_received_at"])

    op.create_table(
        "instances",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("spool_path", sa.String(512), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=False, server_default=""),
        sa.Column("received_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
        sa.UniqueConstraint("sop_instance_uid", name="uq_instances_sop_instance_uid"),
        sa.ForeignKeyConstraint(
            ["series_instance_uid"],
            ["series.series_instance_uid"],
            name="fk_instances_series_instance_uid_series",
        ),
    )
    op.create_index("ix_instances_series_instance_uid", "instances", ["series_instance_uid"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=True),
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
        sa.Column("dedupe_key", sa.String(255), nullable=True),
        sa.Column("lock_key", sa.String(255), nullable=True),
        sa.Column("worker_id", sa.String(128), nullable=True),
        sa.Column("heartbeat_at", UtcDateTime, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("result", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("dedupe_key", name="uq_jobs_dedupe_key"),
    )
    op.create_index("ix_jobs_lock_key", "jobs", ["lock_key"])
    op.create_index("ix_jobs_status_kind_scheduled_at", "jobs", ["status", "kind", "scheduled_at"])
    # At most one running job per lock key, guaranteed by the database (see queue.py).
    op.create_index(
        "uq_jobs_running_lock_key",
        "jobs",
        ["lock_key"],
        unique=True,
        sqlite_where=sa.text("status = 'running'"),
        postgresql_where=sa.text("status = 'running'"),
    )

    op.create_table(
        "results",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=True),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("source_series_instance_uid", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("spool_path", sa.String(512), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_results"),
        sa.UniqueConstraint("sop_instance_uid", name="uq_results_sop_instance_uid"),
    )
    op.create_index("ix_results_job_id", "results", ["job_id"])
    op.create_index("ix_results_source_series_instance_uid", "results", ["source_series_instance_uid"])


def downgrade() -> None:
    op.drop_table("results")
    op.drop_table("jobs")
    op.drop_table("instances")
    op.drop_table("series")
