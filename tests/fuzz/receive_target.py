"""The fuzz target of the receive parse path: bytes in, a stored instance or a named refusal out.

One input is what a peer sends: it is written as a temp file in a Spool's incoming dir and handed to
`receive.ingest.ingest_file` (bounded header read, UID and declared-length checks, spool commit, one
SQLite row), as the C-STORE handler and the STOW-RS endpoint do. Every input must end in either a stored
instance (Success, file in the spool, row in the database) or a refusal with one of the node's named
statuses, must never raise, and must leave nothing in the incoming dir. Anything else is a crash.

Plain Python, no atheris: `fuzz_receive.py` runs it under atheris, tests replay inputs with it directly.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from pydicom.data import get_testdata_files

from dicom_ai_node.domain.conformance import (
    ACCEPTED_TRANSFER_SYNTAXES,
    IMAGE_STORAGE_SOP_CLASSES,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_DOES_NOT_MATCH,
    STATUS_ELEMENT_PAST_END,
    STATUS_INVALID_SOP_INSTANCE,
    STATUS_NESTING_TOO_DEEP,
    STATUS_PIXEL_DATA_TOO_SHORT,
    STATUS_SOP_CLASS_MISMATCH,
    STATUS_SOP_INSTANCE_MISMATCH,
    STATUS_SUCCESS,
)
from dicom_ai_node.domain.ingest import FAILURE_SOP_CLASS_NOT_SUPPORTED, FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED
from dicom_ai_node.persistence.db import create_schema, make_engine
from dicom_ai_node.persistence.repository import SeriesRepository
from dicom_ai_node.persistence.tables import instances
from dicom_ai_node.receive.ingest import ingest_file
from dicom_ai_node.store.spool import Spool

# The refusals the receive path may answer for a peer's bytes. Not 0xA700 (out of resources): with the
# reserve at 0 and a healthy database it would mean the spool or the database failed on peer input.
REFUSALS = frozenset(
    {
        STATUS_CANNOT_UNDERSTAND,
        STATUS_DATASET_DOES_NOT_MATCH,
        STATUS_ELEMENT_PAST_END,
        STATUS_INVALID_SOP_INSTANCE,
        STATUS_NESTING_TOO_DEEP,
        STATUS_PIXEL_DATA_TOO_SHORT,
        STATUS_SOP_CLASS_MISMATCH,
        STATUS_SOP_INSTANCE_MISMATCH,
        FAILURE_SOP_CLASS_NOT_SUPPORTED,
        FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED,
    }
)
# Seeds larger than this would only slow every mutation down; the header path is in the first bytes.
MAX_SEED_BYTES = 256 * 1024


class ReceiveCrash(AssertionError):
    """An input broke a promise of the receive path (the fuzzer reports it as a crash)."""


class _FormatEverything(logging.Handler):
    """Formats every record and drops it: a log call with wrong arguments still fails the input (logging
    would only print it), and the fuzz output stays readable."""

    def handle(self, record: logging.LogRecord) -> bool:
        self.format(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() never calls it
        pass


class ReceiveTarget:
    """A spool and a SQLite database under `workdir`; `__call__` runs one input through the receive path.

    Odd-length inputs go through as STOW-RS does (SOP classes and transfer syntaxes checked by ingest),
    even-length ones as C-STORE does (the presentation contexts already decided them).
    """

    def __init__(self, workdir: Path) -> None:
        self.spool = Spool(workdir / "spool")
        engine = make_engine(f"sqlite:///{workdir / 'node.db'}")
        create_schema(engine)
        self.engine = engine
        self.repo = SeriesRepository(engine)
        self.stored = 0
        self.refused: dict[int, int] = {}
        receive_log = logging.getLogger("dicom_ai_node.receive")
        receive_log.handlers[:] = [_FormatEverything()]
        receive_log.setLevel(logging.DEBUG)
        receive_log.propagate = False
        self._sop_classes = frozenset(str(uid) for uid in IMAGE_STORAGE_SOP_CLASSES)
        self._transfer_syntaxes = frozenset(str(uid) for uid in ACCEPTED_TRANSFER_SYNTAXES)

    def __call__(self, data: bytes) -> None:
        tmp_path = self.spool.incoming / f"{uuid.uuid4().hex}.part"
        tmp_path.write_bytes(data)
        as_stow = len(data) % 2 == 1
        result = ingest_file(
            tmp_path,
            calling="FUZZ",
            spool=self.spool,
            repo=self.repo,
            reserve_bytes=0,
            sop_classes=self._sop_classes if as_stow else None,
            transfer_syntaxes=self._transfer_syntaxes if as_stow else None,
        )
        leftovers = list(self.spool.incoming.iterdir())
        if leftovers:
            raise ReceiveCrash(f"left behind in incoming: {[p.name for p in leftovers]}")
        if result.status == STATUS_SUCCESS:
            self._check_stored(result.sop_instance_uid, result.stored, result.duplicate)
        elif result.status in REFUSALS and not result.stored:
            self.refused[result.status] = self.refused.get(result.status, 0) + 1
        else:
            raise ReceiveCrash(f"answered 0x{result.status:04X} (stored={result.stored}): {result.reason}")

    def _check_stored(self, sop_instance_uid: str, stored: bool, duplicate: bool) -> None:
        with self.engine.connect() as conn:
            spool_path = conn.scalar(
                sa.select(instances.c.spool_path).where(instances.c.sop_instance_uid == sop_instance_uid)
            )
        if not stored or spool_path is None:
            raise ReceiveCrash(f"Success for {sop_instance_uid!r} without a stored row")
        if duplicate:
            return  # its file went away after the first store (below)
        spool_file = self.spool.path(spool_path)
        if not spool_file.is_file():
            raise ReceiveCrash(f"Success for {sop_instance_uid!r} without its spool file")
        # Keeps a long run's disk use flat; the row stays, so a later copy is answered as a duplicate.
        spool_file.unlink()
        self.stored += 1


def seed_files() -> Iterator[Path]:
    """pydicom's own test files (odd transfer syntaxes, character sets, multi-frame, broken ones)."""
    for name in sorted(get_testdata_files()):
        path = Path(name)
        if path.is_file() and path.stat().st_size <= MAX_SEED_BYTES:
            yield path


def write_seed_corpus(directory: Path) -> int:
    """Write the seed corpus into `directory`: pydicom's test files plus the bad-input corpus of
    tests/support/bad_input.py. Returns the number of seeds."""
    from tests.support.bad_input import CASES, bad_instance

    directory.mkdir(parents=True, exist_ok=True)
    count = 0
    for index, path in enumerate(seed_files()):
        (directory / f"pydicom-{index:03d}-{path.name}").write_bytes(path.read_bytes())
        count += 1
    build_dir = directory.parent / f"{directory.name}-build"
    for name in CASES:
        bad = bad_instance(name, build_dir / name)
        (directory / f"bad-{name}.dcm").write_bytes(bad.path.read_bytes())
        count += 1
    return count
