"""Read the few header attributes the node needs from a received file, without touching pixel data.

A received file comes from a peer the node does not control, so reading it is bounded: no value is read
past the end of the file (a declared length never turns into an allocation), a top-level element whose
declared length runs past the end is refused, sequences nested deeper than the reader can follow are
refused, and the Pixel Data element is never read, only its declared length noted. Each refusal is an
`UnreadableDataset` carrying the C-STORE status that names it (domain/conformance.py).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, cast

from pydicom.errors import BytesLengthException
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag, Tag

from dicom_ai_node.domain.conformance import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_ELEMENT_PAST_END,
    STATUS_NESTING_TOO_DEEP,
)
from dicom_ai_node.domain.rules import MATCHABLE_ATTRIBUTES
from dicom_ai_node.errors import InvalidDicomError

# Header attributes kept per series: what rules can match on (minus the node facts CallingAETitle,
# NumberOfInstances and the SOPClassUID stored in its own column), plus expected-count hints
# (route/completion.py: expected_instance_count) and the series number. None of them is PHI.
ROUTING_KEYWORDS: tuple[str, ...] = (
    *(k for k in MATCHABLE_ATTRIBUTES if k not in ("CallingAETitle", "NumberOfInstances", "SOPClassUID")),
    "ImagesInAcquisition",
    "NumberOfTemporalPositions",
    "SeriesType",
    "NumberOfSlices",
    "NumberOfTimeSlices",
    "NumberOfTimeSlots",
    "NumberOfRRIntervals",
    "NumberOfFrames",
    "SeriesNumber",
)
UID_KEYWORDS = ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID")
# What the Pixel Data length check needs (Image Pixel module, PS3.3 C.7.6.3; NumberOfFrames is routing).
IMAGE_KEYWORDS = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "PhotometricInterpretation")

_PIXEL_DATA = 0x7FE00010
# Float and Double Float Pixel Data: never read either (as pydicom's stop_before_pixels).
_OTHER_PIXEL_DATA = frozenset({0x7FE00008, 0x7FE00009})
UNDEFINED_LENGTH = 0xFFFFFFFF
_SPECIFIC_TAGS = [Tag(k) for k in (*UID_KEYWORDS, *ROUTING_KEYWORDS, *IMAGE_KEYWORDS)]
# What pydicom raises on malformed input it reads (found by feeding it broken files): each is "cannot
# understand", never a handler crash.
_PARSE_ERRORS = (
    PydicomInvalidDicomError,
    BytesLengthException,  # a value whose length is no multiple of its VR's size (found by fuzzing)
    EOFError,
    ValueError,  # UnicodeDecodeError included
    KeyError,
    TypeError,
    IndexError,
    AttributeError,
    NotImplementedError,
    OverflowError,
    NameError,  # read_partial's own UnboundLocalError after an EOFError it swallowed
    struct.error,
    zlib.error,
    OSError,
)


class UnreadableDataset(InvalidDicomError):
    """The received file cannot be read as a data set; `status` is the C-STORE status naming why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class PixelDataElement:
    """The top-level Pixel Data element as declared: its VR and value length (0xFFFFFFFF: undefined)."""

    vr: str | None
    length: int


@dataclass(frozen=True)
class Header:
    """What the node reads from a received file. UIDs are "" when absent (the checks in ingest.py refuse
    that); `media_storage_*` are the File Meta Information's (for C-STORE, pynetdicom writes them from
    the request's Affected SOP Class/Instance UID)."""

    uids: dict[str, str]
    attrs: dict[str, Any]
    image: dict[str, Any]
    transfer_syntax_uid: str
    media_storage_sop_class_uid: str
    media_storage_sop_instance_uid: str
    pixel_data: PixelDataElement | None
    # File Meta (0002,0016): the calling AE title a receiver wrote there (the native edge does; the
    # landing indexer records it as the instance's calling AE, receive/landing.py).
    source_application_entity_title: str = ""


def _plain(value: Any) -> Any:
    """DICOM values -> JSON-friendly Python values."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value) if type(value).__name__ in ("DSfloat", "DSdecimal", "IS") else str(value)
    except (TypeError, ValueError):
        return str(value)


class _BoundedFile:
    """A read-only file that never reads past its end: `read(n)` asks the OS for at most what is left.

    CPython's buffered read(n) allocates n bytes before reading, so a declared length of 4 GB in a 1 kB
    file would otherwise allocate 4 GB (or fail with MemoryError on a smaller machine).
    """

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "rb")  # noqa: SIM115 - closed by __exit__
        self.name = str(path)
        self.size = os.fstat(self._fh.fileno()).st_size
        # pydicom reads the whole rest only to inflate a deflated data set (read_partial), whose elements
        # it then reads from memory: positions in this file no longer say where an element is.
        self.read_whole = False

    def read(self, size: int | None = -1) -> bytes:
        left = max(0, self.size - self._fh.tell())
        if size is None or size < 0:
            self.read_whole = True
            return self._fh.read(left)
        return self._fh.read(min(size, left))

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> _BoundedFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _stop_at_pixels(
    fh: _BoundedFile, found: list[PixelDataElement]
) -> Callable[[BaseTag, str | None, int], bool]:
    """pydicom's `stop_when` for the top-level data set: stop at the pixel data (noting the Pixel Data
    element), and refuse an element whose declared length runs past the end of the file (not checked
    for a deflated data set, which pydicom reads from memory; its reads are bounded there anyway).
    """

    def stop_when(tag: BaseTag, vr: str | None, length: int) -> bool:
        past_end = not fh.read_whole and length != UNDEFINED_LENGTH and fh.tell() + length > fh.size
        if past_end:
            raise UnreadableDataset(
                STATUS_ELEMENT_PAST_END,
                f"element {tag} declares {length} bytes, only {max(0, fh.size - fh.tell())} follow",
            )
        if tag == _PIXEL_DATA:
            found.append(PixelDataElement(vr, length))
            return True
        return tag in _OTHER_PIXEL_DATA

    return stop_when


def read_header(path: Path) -> Header:
    """Read the header of a DICOM Part 10 file up to its pixel data.

    Raises UnreadableDataset (an InvalidDicomError) when the file is not parseable DICOM, an element
    declares a length past the end of the file, or sequences are nested too deep.
    """
    found: list[PixelDataElement] = []
    try:
        with _BoundedFile(path) as fh:
            ds = read_partial(
                cast(BinaryIO, fh), _stop_at_pixels(fh, found), specific_tags=list(_SPECIFIC_TAGS)
            )
            # Inside the try: File Meta values are converted from raw bytes on first access, so a malformed
            # one raises here (found by fuzzing: an unknown VR in (0002,0002)).
            meta = {
                k: str(ds.file_meta.get(k, "") or "").strip()
                for k in (
                    "TransferSyntaxUID",
                    "MediaStorageSOPClassUID",
                    "MediaStorageSOPInstanceUID",
                    "SourceApplicationEntityTitle",
                )
            }
            uids = {k: str(ds.get(k, "") or "").strip() for k in UID_KEYWORDS}
            attrs = {k: _plain(ds.get(k)) for k in ROUTING_KEYWORDS if ds.get(k) not in (None, "")}
            image = {k: _plain(ds.get(k)) for k in IMAGE_KEYWORDS if ds.get(k) not in (None, "")}
    except UnreadableDataset:
        raise
    except RecursionError:
        # pydicom reads nested sequences recursively (pydicom #2330); one line, not a 3000-line traceback.
        raise UnreadableDataset(STATUS_NESTING_TOO_DEEP, "sequences nested too deep") from None
    except _PARSE_ERRORS as exc:
        raise UnreadableDataset(
            STATUS_CANNOT_UNDERSTAND, f"unreadable dataset: {type(exc).__name__}: {exc}"
        ) from exc
    return Header(
        uids=uids,
        attrs=attrs,
        image=image,
        transfer_syntax_uid=meta["TransferSyntaxUID"],
        media_storage_sop_class_uid=meta["MediaStorageSOPClassUID"],
        media_storage_sop_instance_uid=meta["MediaStorageSOPInstanceUID"],
        pixel_data=found[0] if found else None,
        source_application_entity_title=meta["SourceApplicationEntityTitle"],
    )
