"""Write result objects as DICOM Part 10 files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydicom.dataset import Dataset


def write_dataset(ds: Dataset, path: Path | str) -> None:
    """Write `ds` as a Part 10 file (preamble, File Meta Information) to `path`.

    `enforce_file_format=True` makes pydicom refuse a dataset without valid file meta instead of
    silently writing a raw dataset. Written to a temporary name in the same folder and renamed, so
    a reader never sees a half-written file (durability, i.e. fsync, is the spool's job).
    """
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fp:
            ds.save_as(fp, enforce_file_format=True)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
