"""Read the few header attributes the node needs from a received file, without touching pixel data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError

from dicom_ai_node.domain.rules import MATCHABLE_ATTRIBUTES
from dicom_ai_node.errors import InvalidDicomError

# Header attributes kept per series: what rules can match on (minus the node facts CallingAETitle,
# NumberOfInstances and the SOPClassUID stored in its own column), plus expected-count hints and the
# series number. None of them is PHI.
ROUTING_KEYWORDS: tuple[str, ...] = (
    *(k for k in MATCHABLE_ATTRIBUTES if k not in ("CallingAETitle", "NumberOfInstances", "SOPClassUID")),
    "ImagesInAcquisition",
    "NumberOfFrames",
    "SeriesNumber",
)
_UID_KEYWORDS = ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID")


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


def read_header(path: Path) -> tuple[dict[str, str], dict[str, Any], str]:
    """Return (uids, routing attributes, transfer syntax UID) of a DICOM Part 10 file.

    Raises InvalidDicomError when the file is not parseable DICOM or lacks one of the four key UIDs.
    """
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=[*_UID_KEYWORDS, *ROUTING_KEYWORDS])
    except (PydicomInvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        raise InvalidDicomError(f"unreadable dataset: {type(exc).__name__}: {exc}") from exc
    uids = {}
    for keyword in _UID_KEYWORDS:
        value = str(ds.get(keyword, "") or "").strip()
        if not value:
            raise InvalidDicomError(f"missing {keyword}")
        uids[keyword] = value
    attrs = {k: _plain(ds.get(k)) for k in ROUTING_KEYWORDS if ds.get(k) not in (None, "")}
    tsyntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    return uids, attrs, tsyntax
