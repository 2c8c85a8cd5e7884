"""completion signal: series.complete_signalled_at

Set when a sender signals that a series is complete (it released the association that carried it, for
peers with `series_complete_on_release`), so the completion sweep of any node process routes the series
at once, also after a crash between the release and the sweep. Existing rows get NULL: no signal.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dicom_ai_node.persistence.tables import UtcDateTime

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # A nullable column without a default: an in-place ALTER TABLE on both engines, no table copy.
    op.add_column("series", sa.Column("complete_signalled_at", UtcDateTime, nullable=True))


def downgrade() -> None:
    # SQLite >= 3.35 (the node's minimum) drops columns in place; no table copy is needed.
    with op.batch_alter_table("series", recreate="never") as batch:
        batch.drop_column("complete_signalled_at")
