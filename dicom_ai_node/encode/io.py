"""Write result objects as DICOM Part 10 files."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from pydicom.dataset import Dataset


def write_dataset(ds: Dataset, path: Path | str) -> None:
    """Write `ds` as a Part 10 file (preamble, File Meta Information) to `path`.

    `enforce_file_format=True` makes pydicom refuse a dataset without valid file meta instead of
    silently writing a raw dataset. Written to a temporary name in the same folder and renamed, so
    a reader never sees a half-written file (durability, i.e. fsync, is the spool's job).
    """
    target = Path(path)
    # open(..., "xb") honours the umask (mkstemp would force 0600 on a file other tools must read).
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex}.dcm")
    try:
        with open(tmp, "xb") as fp:
            ds.save_as(fp, enforce_file_format=True)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
