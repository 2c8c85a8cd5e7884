"""What receiving one instance over either edge (C-STORE or STOW-RS) reports, and the STOW-RS limits.

Pure types: the receive package fills them, the api package (which may not import receive) reads them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# STOW-RS failure reasons (PS3.18 10.5.3, Store Instances Response; the codes are the DIMSE ones of PS3.4
# Annex B / PS3.7 C.4.2.1.4 that PS3.18 names for FailureReason (0008,1197)).
FAILURE_OUT_OF_RESOURCES = 0xA700  # spool under its reserve, spool or database error: retry later
FAILURE_STUDY_MISMATCH = 0xA900  # data set does not match: not in the study of the URL, or UIDs missing
FAILURE_CANNOT_UNDERSTAND = 0xC000  # the part is not a DICOM Part 10 instance (or not application/dicom)
FAILURE_SOP_CLASS_NOT_SUPPORTED = 0x0122  # a SOP class the node does not accept (the SCP's list)
FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # a transfer syntax the node does not accept


@dataclass(frozen=True)
class IngestResult:
    """One received instance: `status` is the DIMSE status (C-STORE) or FailureReason (STOW-RS).

    `stored` is True when the instance is durably in the spool and the database, `duplicate` when its SOP
    Instance UID was stored before (kept once, still a success). UIDs are empty when the file had none.
    """

    status: int
    sop_class_uid: str
    sop_instance_uid: str
    reason: str
    stored: bool
    duplicate: bool = False
    study_instance_uid: str = ""
    size_bytes: int = 0
    series_instance_uid: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 0x0000


# (temp file in the spool's incoming dir, calling label for the calling_ae column, expected Study UID)
# -> result. The temp file is moved into the spool or deleted; it never stays behind.
Ingest = Callable[[Path, str, str | None], IngestResult]


@dataclass(frozen=True)
class StowLimits:
    max_request_bytes: int = 2048 * 2**20
    max_part_bytes: int = 1024 * 2**20


# PS3.5 6.2: an AE title is at most 16 printable characters without backslash.
_AE_MAX = 16
_NOT_AE_CHARACTER = re.compile(r"[^\x20-\x5b\x5d-\x7e]")


def calling_label(name: str, default: str = "STOW") -> str:
    """An AE-title-like label (<= 16 printable characters, no backslash) for the calling_ae column.

    STOW-RS senders have no AE title; the node records the API token's name instead, so routing rules can
    match STOW-RS series on CallingAETitle the way they match DIMSE peers.
    """
    label = _NOT_AE_CHARACTER.sub("_", name).strip()[:_AE_MAX].strip()
    return label or default
