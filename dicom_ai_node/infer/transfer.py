"""Passing arrays between the worker and the inference process through files in /dev/shm.

The float32 volume goes through a file in /dev/shm (tmpfs: memory, no disk I/O; the temp directory when
/dev/shm is missing or full) that the child maps read-only, so a 300 MB series is neither pickled nor
copied into the pipe, and the child sees it without a second copy. The label map comes back the same
way. Plain write() rather than a shared mmap on the writing side: a full tmpfs then gives ENOSPC (an
error we can report) instead of SIGBUS (a dead worker). The parent unlinks every transfer file in a
`finally`, also after timeouts and crashes; files left by a parent that was itself killed are swept when
the next host starts (their names carry the parent's pid).
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dicom_ai_node.errors import InferenceError

# Transfer files are named f"{TRANSFER_PREFIX}{parent pid}-{request token}-{in|out}".
TRANSFER_PREFIX = "ainode-infer-"
# A MONAI bundle's scratch directory in the temp directory: f"{BUNDLE_WORKDIR_PREFIX}{child pid}-{model}-..."
BUNDLE_WORKDIR_PREFIX = "ainode-bundle-"


def default_transfer_dirs() -> list[Path]:
    dirs = [Path("/dev/shm")] if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else []
    return [*dirs, Path(tempfile.gettempdir())]


def write_array(dirs: Sequence[Path], name: str, array: np.ndarray) -> Path:
    """Write a C-contiguous array to `name` in the first directory with room; returns its path."""
    data = array.data.cast("B")
    problems: list[str] = []
    for directory in dirs:
        path = directory / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            problems.append(f"{directory}: {exc.strerror}")
            continue
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:
                written = 0
                while written < len(data):
                    written += f.write(data[written:]) or 0
            return path
        except OSError as exc:  # ENOSPC on a small /dev/shm: try the next directory
            path.unlink(missing_ok=True)
            problems.append(f"{directory}: {exc.strerror}")
    raise InferenceError(f"cannot pass {array.nbytes} bytes to the inference process ({'; '.join(problems)})")


def shared_array(
    dirs: Sequence[Path], name: str, shape: tuple[int, ...], dtype: str
) -> tuple[Path, np.ndarray]:
    """A new file `name` for an array of `shape` in the first directory with room, mapped writable and
    shared: what is written into the array is in the file, for another process to map.

    The whole size is allocated up front (posix_fallocate), so a full /dev/shm gives ENOSPC here, and the
    next directory is tried, rather than SIGBUS at a write later.
    """
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    problems: list[str] = []
    for directory in dirs:
        path = directory / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            problems.append(f"{directory}: {exc.strerror}")
            continue
        try:
            os.posix_fallocate(fd, 0, size)
            mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:  # ENOSPC on a small /dev/shm: try the next directory
            path.unlink(missing_ok=True)
            problems.append(f"{directory}: {exc.strerror}")
            continue
        finally:
            os.close(fd)  # the mapping keeps the file
        return path, np.frombuffer(mapped, dtype=np.dtype(dtype)).reshape(shape)
    raise InferenceError(f"cannot allocate {size} bytes for the inference process ({'; '.join(problems)})")


def release_pages(array: np.ndarray, start: int, stop: int) -> None:
    """Drop bytes [start, stop) of `array` from this process's resident memory if the array maps a file
    (shared_array): MADV_DONTNEED on a shared file mapping keeps the content in the file, and a later read
    pages it in again. For any other array, nothing."""
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    if not isinstance(base, mmap.mmap):
        return
    offset = (
        array.__array_interface__["data"][0]
        - np.frombuffer(base, dtype=np.uint8).__array_interface__["data"][0]
    )
    first = (offset + start) // mmap.PAGESIZE * mmap.PAGESIZE
    last = min(offset + stop, len(base))
    if last > first:
        base.madvise(mmap.MADV_DONTNEED, first, last - first)


def read_array(path: Path, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    count = int(np.prod(shape))
    array = np.fromfile(path, dtype=np.dtype(dtype), count=count)
    if array.size != count:
        raise InferenceError(f"inference process returned {array.size} values, expected {count}")
    return array.reshape(shape)


def sweep_stale_transfers(dirs: Sequence[Path]) -> None:
    """Remove transfer files of parents that no longer run (killed before their `finally`)."""
    for directory in dirs:
        sweep_dead_pid_entries(directory, TRANSFER_PREFIX)


def sweep_dead_pid_entries(directory: Path, prefix: str) -> None:
    """Remove files and directories named f"{prefix}{pid}-..." whose process no longer runs.

    For scratch space a killed process could not clean up: its `finally` never ran.
    """
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        pid_text = name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or pid_exists(int(pid_text)):
            continue
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
