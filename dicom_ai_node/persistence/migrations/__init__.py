"""Alembic migrations of the node's schema, run through `dicom_ai_node.persistence.db` (no alembic.ini).

A schema change: edit tables.py, then add ``versions/rev_<NNNN>_<slug>.py`` (revision "<NNNN>",
down_revision the previous one) with hand-written ops that work on SQLite and PostgreSQL, and a
downgrade. tests/contract/test_migrations.py fails until the migrations and tables.py agree. File names
start with a letter so the modules stay importable and type-checked.
"""
