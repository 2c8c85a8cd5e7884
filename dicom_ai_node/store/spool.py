"""The spool: durable files named by UUID, never by DICOM values.

Write protocol (docs/architecture.md, "Why it never loses a study"): temp file in the spool -> fsync ->
rename -> fsync dir.
Only after that (and the DB commit) may the SCP answer Success. File names come from uuid4, so no DICOM
value (which a peer controls) ever becomes part of a path.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from pydicom import Dataset

from dicom_ai_node.errors import StorageError

INSTANCES = "instances"
RESULTS = "results"
INCOMING = "incoming"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / INCOMING
        for area in (INCOMING, INSTANCES, RESULTS):
            (self.root / area).mkdir(parents=True, exist_ok=True)

    def path(self, relative: str) -> Path:
        resolved = (self.root / relative).resolve()
        if self.root.resolve() not in resolved.parents:
            raise StorageError(f"spool path escapes the spool: {relative!r}")
        return resolved

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def has_space(self, reserve_bytes: int) -> bool:
        return self.free_bytes() > reserve_bytes

    def _new_relative(self, area: str) -> tuple[str, Path]:
        name = uuid.uuid4().hex
        # Two hex levels keep directories small at millions of files.
        rel = f"{area}/{name[:2]}/{name}.dcm"
        target = self.root / rel
        if not target.parent.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            _fsync_dir(target.parent.parent)
        return rel, target

    def commit_file(self, tmp_path: Path, area: str = INSTANCES) -> str:
        """Durably move a finished temp file into the spool; return its spool-relative path."""
        rel, target = self._new_relative(area)
        try:
            _fsync_file(tmp_path)
            try:
                os.replace(tmp_path, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # Temp file on another filesystem: copy into the spool's own incoming dir, then rename.
                staged = self.incoming / f"{uuid.uuid4().hex}.part"
                shutil.copyfile(tmp_path, staged)
                _fsync_file(staged)
                os.replace(staged, target)
                os.unlink(tmp_path)
            _fsync_dir(target.parent)
        except OSError as exc:
            raise StorageError(f"cannot store file in spool: {exc.strerror or exc}") from exc
        return rel

    def write_bytes(self, data: bytes, area: str = INSTANCES) -> str:
        staged = self.incoming / f"{uuid.uuid4().hex}.part"
        try:
            with open(staged, "wb") as fh:
                fh.write(data)
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise StorageError(f"cannot write to spool: {exc.strerror or exc}") from exc
        return self.commit_file(staged, area)

    def write_dataset(self, ds: Dataset, area: str = RESULTS) -> str:
        staged = self.incoming / f"{uuid.uuid4().hex}.part"
        try:
            ds.save_as(staged, enforce_file_format=True)
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise StorageError(f"cannot write dataset to spool: {exc.strerror or exc}") from exc
        return self.commit_file(staged, area)

    def remove(self, relative: str) -> None:
        self.path(relative).unlink(missing_ok=True)

    def clean_incoming(self) -> int:
        """Delete leftovers of writes interrupted by a crash (never acknowledged, so safe to drop)."""
        removed = 0
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed
