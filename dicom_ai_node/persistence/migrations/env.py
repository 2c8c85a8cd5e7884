"""Alembic environment: runs on the connection `persistence.db` hands in, never one of its own.

The caller (`upgrade_schema`, `downgrade_schema`) has already opened the transaction: on SQLite that is a
``BEGIN IMMEDIATE`` from our engine, so two processes upgrading at once queue up behind the write lock
and the second finds the schema already at head; on PostgreSQL an advisory lock does the same. Alembic
sees the open transaction and adds none of its own; the caller commits.
"""

from __future__ import annotations

from alembic import context

from dicom_ai_node.persistence.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through dicom_ai_node.persistence.db (dicom-ai-node db upgrade)")

context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite can alter little in place; batch mode (copy and move) is what autogenerate should write.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
