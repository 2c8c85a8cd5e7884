"""Where pynetdicom's chunked C-STORE receive writes each dataset: the spool's incoming dir of the AE.

With ``_config.STORE_RECV_CHUNKED_DATASET`` pynetdicom streams a received dataset into
``tempfile.NamedTemporaryFile(delete=False, suffix=".dcm")`` without a ``dir`` (dimse_messages.py,
pynetdicom 3.0), so the file lands in the process-wide temp dir. Setting ``tempfile.tempdir`` would move
every temp file of the process (model work dirs, other libraries) into the spool, and two SCPs in one
process could not have two spools. pynetdicom offers no per-AE setting, so this module replaces the one
name pynetdicom's DIMSE decoder calls: the replacement adds ``dir=`` for the AE whose association is
decoding (decoding runs on that association's DUL thread) and otherwise behaves exactly as the
original. An AE that registered no directory keeps the system temp dir; the spool then copies the file
in instead of renaming it (Spool.commit_file handles EXDEV), so nothing is lost either way.
"""

from __future__ import annotations

import tempfile
import threading
import weakref
from pathlib import Path
from typing import IO, Any

from pynetdicom import AE, dimse_messages

_incoming_dirs: weakref.WeakKeyDictionary[AE, Path] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def receive_into(ae: AE, directory: Path) -> None:
    """Make chunked C-STORE receive on `ae`'s associations write its temp files in `directory`."""
    with _lock:
        _incoming_dirs[ae] = directory
        dimse_messages.NamedTemporaryFile = _named_temporary_file  # type: ignore[attr-defined,assignment]


def incoming_dir_of(ae: AE) -> Path | None:
    return _incoming_dirs.get(ae)


def _named_temporary_file(*args: Any, **kwargs: Any) -> IO[bytes]:
    if kwargs.get("dir") is None:
        directory = _directory_of_current_association()
        if directory is not None:
            kwargs["dir"] = directory
    return tempfile.NamedTemporaryFile(*args, **kwargs)


def _directory_of_current_association() -> Path | None:
    # The decoding thread is the association's DUL (pynetdicom.dul.DULServiceProvider, which has .assoc).
    assoc = getattr(threading.current_thread(), "assoc", None)
    ae = getattr(assoc, "ae", None)
    return _incoming_dirs.get(ae) if isinstance(ae, AE) else None
