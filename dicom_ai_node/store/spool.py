"""The spool: durable files named by UUID, never by DICOM values.

Write protocol (docs/architecture.md, "Why it never loses a study"): temp file in the spool -> fsync ->
rename -> fsync dir.
Only after that (and the DB commit) may the SCP answer Success. File names come from uuid4, so no DICOM
value (which a peer controls) ever becomes part of a path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
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
        # Shard directories whose entry in their parent this process has fsynced (see _new_relative).
        self._durable_dirs: set[Path] = set()
        for area in (INCOMING, INSTANCES, RESULTS):
            (self.root / area).mkdir(parents=True, exist_ok=True)
        # The areas' own entries, durable before any file in them is acknowledged (first start).
        _fsync_dir(self.root)

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
        shard = target.parent
        if shard not in self._durable_dirs:
            # Whoever created the shard (another thread or process may be doing it right now), its entry
            # must be durable before a file in it is acknowledged: "exists" is not "fsynced".
            shard.mkdir(parents=True, exist_ok=True)
            _fsync_dir(shard.parent)
            self._durable_dirs.add(shard)
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

    def replace_dataset(self, relative: str, ds: Dataset) -> None:
        """Durably replace the file at spool path `relative` with `ds` (written aside, renamed over it).

        For a result object stored again under its deterministic SOP Instance UID (a retried or re-run
        job): the row keeps naming the same file, and no earlier copy is left that no row names.
        """
        target = self.path(relative)
        staged = self.incoming / f"{uuid.uuid4().hex}.part"
        try:
            ds.save_as(staged, enforce_file_format=True)
            _fsync_file(staged)
            os.replace(staged, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise StorageError(f"cannot replace {relative} in the spool: {exc.strerror or exc}") from exc

    def remove(self, relative: str) -> None:
        self.path(relative).unlink(missing_ok=True)

    def clean_incoming(self) -> int:
        """Delete leftovers of writes interrupted by a crash (never acknowledged, so safe to drop)."""
        removed = 0
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    @contextmanager
    def held(self, tmp_path: Path) -> Iterator[Path]:
        """Hold an exclusive lock (flock) on a received temp file while it is committed and recorded;
        yields the path to commit.

        The lock follows the file through commit_file's rename (same inode) and lasts until the caller's
        block ends, after its database commit (or its removal of the file). So `remove_orphans` can tell
        a file whose writer is between its rename and its commit (locked) from one that a killed process
        left behind (unlocked: the kernel drops a dead process's locks). A temp file on another
        filesystem is first copied into incoming: a rename cannot cross filesystems, and a copy would
        not carry the lock.
        """
        local = tmp_path
        try:
            if os.stat(tmp_path).st_dev != os.stat(self.incoming).st_dev:
                local = self.incoming / f"{uuid.uuid4().hex}.part"
                shutil.copyfile(tmp_path, local)
            fd = os.open(local, os.O_RDONLY)
        except OSError as exc:
            if local != tmp_path:
                local.unlink(missing_ok=True)
            raise StorageError(f"cannot stage file in spool: {exc.strerror or exc}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass  # no locks on this filesystem: remove_orphans cannot lock either and keeps the file
            yield local
        finally:
            os.close(fd)
            if local != tmp_path:
                local.unlink(missing_ok=True)  # gone already when it was committed

    def remove_orphans(
        self, recorded: Callable[[], Collection[str]], is_recorded: Callable[[str], bool]
    ) -> int:
        """Delete instance files no database row names; return how many.

        A process killed between a file's rename into the spool and its database commit (or between the
        commit of a duplicate and the removal of its copy) leaves one; it was never acknowledged.
        `recorded()`: the spool paths the instance rows name; `is_recorded(path)`: whether a row names
        `path` now. A file still locked (`held`) belongs to a live writer in this or another process
        sharing the spool and is left alone; an unlocked one is checked again under the lock, since its
        writer may have committed after `recorded()` was read.
        """
        known = set(recorded())
        removed = 0
        for path in (self.root / INSTANCES).glob("*/*.dcm"):
            relative = path.relative_to(self.root).as_posix()
            if relative in known:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # its writer removed it (a duplicate, or a failed commit)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # held by a live writer (or no locks here): not ours to judge
                if not is_recorded(relative):
                    path.unlink(missing_ok=True)
                    removed += 1
            finally:
                os.close(fd)
        return removed
