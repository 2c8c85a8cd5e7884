"""Small helpers shared by the repository and the queue (no public API)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

# Re-exported for the persistence modules; other packages import them from domain/clock.py.
from dicom_ai_node.domain.clock import Clock as Clock
from dicom_ai_node.domain.clock import utcnow as utcnow


def insert_for(engine: sa.Engine, table: sa.Table) -> pg_dialect.Insert | sqlite_dialect.Insert:
    """An INSERT that supports ON CONFLICT on both engines (same API in both dialects)."""
    if engine.dialect.name == "postgresql":
        return pg_dialect.insert(table)
    return sqlite_dialect.insert(table)


def _json_default(value: object) -> object:
    # pydicom MultiValue and similar sequences become lists; anything else its text form.
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    return str(value)


def dump_json(value: Mapping[str, Any] | None) -> str:
    return json.dumps(dict(value or {}), sort_keys=True, default=_json_default)


def load_json(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    loaded = json.loads(text)
    return loaded if isinstance(loaded, dict) else {"value": loaded}
