"""Audit events of the worker, in the spirit of PS3.15 A.5.3.10 "DICOM Instances Transferred".

- role "source": one event per deliver job that sent its results (with whether the destination's read-back
  verified them), and one `outcome: failed` event when a deliver job goes dead;
- role "destination", via pull: one event per finished pull job (the instances themselves arrived
  through the SCP or the retrieve path).

UIDs, counts, names of configured peers and their addresses only: the result headers read here are
limited to the study, series and SOP instance UIDs. Writes never fail the job (`AuditLog.record_quietly`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.domain.peers import Destination
from dicom_ai_node.errors import ConfigError, StorageError
from dicom_ai_node.persistence.audit import AuditLog
from dicom_ai_node.persistence.queue import Job
from dicom_ai_node.pull.service import PullProgress
from dicom_ai_node.receive.audit import ACTION_TRANSFERRED, MAX_STUDIES, study_target
from dicom_ai_node.store.spool import Spool

log = logging.getLogger(__name__)

_UID_TAGS = ["StudyInstanceUID", "SeriesInstanceUID"]


def destination_address(dest: Destination) -> str:
    """AE@host:port, or the DICOMweb URL without any user:password part."""
    if dest.type == "dicom":
        return f"{dest.ae_title}@{dest.host}:{dest.port}"
    parts = urlsplit(dest.url or "")
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _uids_of(paths: Sequence[Path]) -> tuple[list[str], list[str]]:
    """(study UIDs, series UIDs) of the result files, in order, each once."""
    studies: dict[str, None] = {}
    series: dict[str, None] = {}
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=_UID_TAGS)
        except (OSError, InvalidDicomError) as exc:
            log.debug("audit: no UIDs from %s: %s", path.name, exc)
            continue
        studies.setdefault(str(ds.get("StudyInstanceUID", "")), None)
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), None)
    return [s for s in studies if s][:MAX_STUDIES], [s for s in series if s][:MAX_STUDIES]


def audit_delivered(
    audit: AuditLog,
    job: Job,
    dest: Destination,
    ae_title: str,
    paths: Sequence[Path],
    result: dict[str, Any],
) -> None:
    """A deliver job sent its results (`result`: the job's result, as run_deliver returns it)."""
    studies, series = _uids_of(paths)
    verified = bool(result.get("verified"))
    audit.record_quietly(
        actor=ae_title,
        source="worker",
        action=ACTION_TRANSFERRED,
        target=study_target(studies),
        outcome="ok",
        detail={
            "role": "source",
            "via": "C-STORE" if dest.type == "dicom" else "STOW-RS",
            "job_id": job.id,
            "destination": dest.name,
            "address": destination_address(dest),
            "studies": studies,
            "series": series,
            "instances": len(result.get("sent", [])),
            "warnings": len(result.get("warnings", {})),
            "fallback": bool(result.get("fallback")),
            "verified": verified,
            **({"verify_error": result["verify_error"]} if result.get("verify_error") else {}),
        },
    )


def audit_deliver_dead(audit: AuditLog, settings: NodeSettings, spool: Spool, job: Job, error: str) -> None:
    """A deliver job went to the dead letter: its results did not reach the destination."""
    payload = job.payload
    name = str(payload.get("destination", ""))
    detail: dict[str, Any] = {"role": "source", "job_id": job.id, "destination": name}
    try:
        dest = settings.destination(name)
    except ConfigError:
        pass  # a destination removed from the configuration: the name is all there is
    else:
        detail["via"] = "C-STORE" if dest.type == "dicom" else "STOW-RS"
        detail["address"] = destination_address(dest)
    files = [str(f) for f in payload.get("files", []) if isinstance(f, str)]
    paths = []
    for relative in files:
        try:
            paths.append(spool.path(relative))
        except StorageError:
            continue  # a payload naming a path outside the spool: counted, never read
    studies, series = _uids_of(paths)
    detail.update(
        studies=studies, series=series, instances=len(files), attempts=job.attempts, error=error[:500]
    )
    audit.record_quietly(
        actor=settings.ae_title,
        source="worker",
        action=ACTION_TRANSFERRED,
        target=study_target(studies),
        outcome="failed",
        detail=detail,
    )


def audit_pulled(audit: AuditLog, ae_title: str, job: Job, state: PullProgress) -> None:
    """A pull job finished: the study came from `state.source` into this node."""
    outcome = "failed" if state.refused or state.failed else "ok"
    audit.record_quietly(
        actor=ae_title,
        source="worker",
        action=ACTION_TRANSFERRED,
        target=state.study_instance_uid,
        outcome=outcome,
        detail={
            "role": "destination",
            "via": state.method,
            "job_id": job.id,
            "source": state.source,
            "studies": [state.study_instance_uid],
            "series": state.series_done,
            "instances": state.retrieved,
            "stored": state.stored,
            "duplicates": state.duplicates,
            "refused": state.refused,
            "failed": state.failed,
        },
    )
