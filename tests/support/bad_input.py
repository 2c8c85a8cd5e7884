"""A corpus of bad DICOM input, built on the fly: Part 10 files the receive edges must refuse precisely.

Each file is written byte by byte (preamble, File Meta Information, data set, then any raw bytes), so the
File Meta Information can disagree with the data set and elements can be malformed; sent over C-STORE
with pynetdicom's chunked send (`_config.STORE_SEND_CHUNKED_DATASET`), the request's Affected SOP Class
and Instance UID are the File Meta Information's and the data set goes on the wire exactly as written.
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, RTPlanStorage, generate_uid

from dicom_ai_node.devtools.dcmtk import DCMTK_ENV, dcmtk_tool
from dicom_ai_node.devtools.synthetic import write_ct_series

INVALID_UID = "1.2.3/../4"  # a path in a UID: characters other than digits and dots
LEADING_ZERO_UID = "1.2.03.4"  # PS3.5 9.1: no leading zero in a component of more than one digit
EMPTY_COMPONENT_UID = "1.2..3"
LONG_UID = "1." + "2" * 70  # more than 64 characters


def ct_dataset(directory: Path) -> Dataset:
    """One fresh, valid 32 x 32 CT image."""
    [path] = write_ct_series(directory / generate_uid(), n_slices=1, rows=32, cols=32)
    return dcmread(path)


def write_part10(
    path: Path,
    ds: Dataset,
    *,
    media_sop_class: str | None = None,
    media_sop_instance: str | None = None,
    extra: bytes = b"",
) -> Path:
    """`ds` as a Part 10 file (Explicit VR Little Endian) whose File Meta Information names the given
    SOP class/instance (default: the data set's), followed by `extra` raw bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(media_sop_class or ds.SOPClassUID)
    meta.MediaStorageSOPInstanceUID = UID(media_sop_instance or ds.SOPInstanceUID)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    body = BytesIO()
    out = DicomFileLike(body)
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    with open(path, "wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(fh), meta)
        fh.write(body.getvalue() + extra)
    return path


def _nested_sequences(depth: int) -> bytes:
    """(0040,A730) Content Sequence items nested `depth` deep, all of undefined length."""
    opening = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    closing = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return opening * depth + closing * depth


@dataclass(frozen=True)
class BadInstance:
    """One bad instance: its file, the UID the C-STORE request announces, its series, and the answers."""

    name: str
    path: Path
    announced_sop_instance_uid: str
    series_instance_uid: str
    c_store_status: int
    stow_failure_reason: int


def _short_pixel_data(ds: Dataset, path: Path) -> Path:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return write_part10(path, ds)


def _invalid_uid_everywhere(uid: str) -> Callable[[Dataset, Path], Path]:
    def build(ds: Dataset, path: Path) -> Path:
        ds.SOPInstanceUID = uid
        return write_part10(path, ds)

    return build


def _invalid_in_dataset_only(keyword: str, uid: str) -> Callable[[Dataset, Path], Path]:
    def build(ds: Dataset, path: Path) -> Path:
        announced = str(ds.SOPInstanceUID)
        setattr(ds, keyword, uid)
        return write_part10(path, ds, media_sop_instance=announced)

    return build


def _other_sop_instance(ds: Dataset, path: Path) -> Path:
    return write_part10(path, ds, media_sop_instance=generate_uid())


def _rt_plan_in_ct_context(ds: Dataset, path: Path) -> Path:
    ds.SOPClassUID = RTPlanStorage
    return write_part10(path, ds, media_sop_class=CTImageStorage)


def _element_past_end(ds: Dataset, path: Path) -> Path:
    # After the UIDs and the image attributes (no Pixel Data): a private UN element declaring ~2 GB.
    del ds.PixelData
    element = b"\x29\x00\x10\x10UN\x00\x00" + struct.pack("<I", 0x7FFFFFF0) + b"junk"
    return write_part10(path, ds, extra=element)


def _deep_nesting(ds: Dataset, path: Path) -> Path:
    del ds.PixelData  # the sequence (group 0040) must come after the UIDs and before any pixel data
    return write_part10(path, ds, extra=_nested_sequences(5000))


# name -> (builder, C-STORE status, STOW-RS FailureReason)
CASES: dict[str, tuple[Callable[[Dataset, Path], Path], int, int]] = {
    "short-pixel-data": (_short_pixel_data, 0xC214, 0xC000),
    "invalid-sop-instance-uid": (_invalid_uid_everywhere(INVALID_UID), 0x0117, 0xA900),
    "leading-zero-sop-instance-uid": (_invalid_uid_everywhere(LEADING_ZERO_UID), 0x0117, 0xA900),
    "invalid-sop-instance-uid-in-dataset-only": (
        _invalid_in_dataset_only("SOPInstanceUID", INVALID_UID),
        0xA900,
        0xA900,
    ),
    "long-sop-instance-uid-in-dataset-only": (
        _invalid_in_dataset_only("SOPInstanceUID", LONG_UID),
        0xA900,
        0xA900,
    ),
    "long-study-uid": (_invalid_in_dataset_only("StudyInstanceUID", LONG_UID), 0xA900, 0xA900),
    "empty-component-series-uid": (
        _invalid_in_dataset_only("SeriesInstanceUID", EMPTY_COMPONENT_UID),
        0xA900,
        0xA900,
    ),
    "sop-instance-differs-from-request": (_other_sop_instance, 0xA901, 0xA900),
    "rt-plan-in-ct-context": (_rt_plan_in_ct_context, 0xA902, 0xA900),
    "element-length-past-end": (_element_past_end, 0xC212, 0xC000),
    "sequences-nested-5000-deep": (_deep_nesting, 0xC213, 0xC000),
}


def bad_instance(name: str, directory: Path) -> BadInstance:
    """Build the corpus entry `name` in `directory`."""
    build, status, reason = CASES[name]
    directory.mkdir(parents=True, exist_ok=True)
    ds = ct_dataset(directory)
    series = str(ds.SeriesInstanceUID)
    path = build(ds, directory / f"{name}.dcm")
    announced = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
    return BadInstance(name, path, announced, series, status, reason)


def storescu_once(port: int, path: Path, called: str = "AINODE") -> subprocess.CompletedProcess[str]:
    """DCMTK storescu -v sending one file from STORESCU, output kept whatever the exit status (the
    refusal tests read storescu's own account of the response; devtools' storescu raises instead)."""
    argv = [
        dcmtk_tool("storescu"),
        "-v",
        "-aet",
        "STORESCU",
        "-aec",
        called,
        "127.0.0.1",
        str(port),
        str(path),
    ]
    return subprocess.run(argv, capture_output=True, text=True, env=DCMTK_ENV, timeout=60)
