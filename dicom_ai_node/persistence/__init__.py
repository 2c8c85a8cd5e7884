"""Persistence: the only SQLAlchemy user (tables, repositories, the durable job queue)."""

from dicom_ai_node.persistence.db import create_schema, is_postgres, is_sqlite, make_engine
from dicom_ai_node.persistence.queue import Job, JobQueue, LeaseLostError
from dicom_ai_node.persistence.repository import (
    InstanceRecord,
    InstanceRow,
    ResultRow,
    SeriesRepository,
    SeriesRow,
    SeriesStatus,
)

__all__ = [
    "InstanceRecord",
    "InstanceRow",
    "Job",
    "JobQueue",
    "LeaseLostError",
    "ResultRow",
    "SeriesRepository",
    "SeriesRow",
    "SeriesStatus",
    "create_schema",
    "is_postgres",
    "is_sqlite",
    "make_engine",
]
