"""persistence/ turns "the database cannot be used" into errors.DatabaseError; callers never see SQLAlchemy."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_ai_node.devtools.ports import free_port
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.errors import DatabaseError, TransientError
from dicom_ai_node.persistence.db import make_engine
from dicom_ai_node.persistence.queue import JobQueue
from dicom_ai_node.persistence.repository import SeriesRepository
from dicom_ai_node.receive.ingest import ingest_file
from dicom_ai_node.store.spool import Spool


def _unreachable_engine():  # type: ignore[no-untyped-def]
    # Nothing listens on a fresh free port: the driver's connect fails at once (OperationalError).
    return make_engine(f"postgresql://ainode@127.0.0.1:{free_port()}/none")


def test_repository_and_queue_raise_database_error_naming_no_sql() -> None:
    engine = _unreachable_engine()
    try:
        with pytest.raises(DatabaseError, match="database unavailable") as caught:
            SeriesRepository(engine).get_series("1.2.3")
        assert isinstance(caught.value, TransientError)  # the worker retries it with backoff
        assert "SELECT" not in str(caught.value)
        with pytest.raises(DatabaseError):
            JobQueue(engine).counts()
    finally:
        engine.dispose()


def test_ingest_answers_out_of_resources_and_keeps_no_file_when_the_database_is_down(tmp_path: Path) -> None:
    engine = _unreachable_engine()
    spool = Spool(tmp_path / "spool")
    received = write_ct_series(tmp_path / "ct", n_slices=1)[0]
    try:
        result = ingest_file(
            received, calling="TESTSCU", spool=spool, repo=SeriesRepository(engine), reserve_bytes=0
        )
    finally:
        engine.dispose()
    assert result.status == 0xA700 and not result.stored
    assert list((tmp_path / "spool" / "instances").rglob("*.dcm")) == []
