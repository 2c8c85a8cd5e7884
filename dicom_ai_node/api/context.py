"""Everything the admin API works with, built by the node (node.py) and passed to `create_app`.

The api package imports domain + persistence only; probes, readiness checks and model summaries that need
the delivery or inference packages come in as callables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from dicom_ai_node.domain.catalog import (
    AuthSettings,
    CheckResult,
    DestinationInfo,
    ModelInfo,
    ProbeResult,
    SourceInfo,
    StudyMatchInfo,
    StudyQuery,
)
from dicom_ai_node.domain.ingest import Ingest, StowLimits
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.persistence.accounts import AccountRepository
from dicom_ai_node.persistence.audit import AuditLog
from dicom_ai_node.persistence.queue import JobQueue
from dicom_ai_node.persistence.repository import SeriesRepository
from dicom_ai_node.persistence.rules_store import RuleStore


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class AdminContext:
    repo: SeriesRepository
    queue: JobQueue
    rules: RuleStore
    accounts: AccountRepository
    audit: AuditLog
    destinations: list[DestinationInfo]
    probe_destination: Callable[[str], ProbeResult]  # C-ECHO / QIDO-RS, with its own timeout
    models: Callable[[], list[ModelInfo]]
    readiness: Callable[[], dict[str, CheckResult]]  # database, spool, inference
    metrics: NodeMetrics | None
    auth: AuthSettings
    version: str
    ae_title: str
    dicom_port: int
    # Sign-in rate-limit windows; tests pass the clock they give the repositories.
    clock: Callable[[], datetime] = field(default=_utcnow)
    # STOW-RS receive (api/routers/stow.py): the same ingest path as C-STORE (receive/ingest.py), and the
    # spool's incoming dir, where request parts are streamed so that storing one is an atomic rename.
    # None: STOW-RS is off (dicomweb.stow_enabled: false, or an API without a spool).
    ingest: Ingest | None = None
    incoming_dir: Path | None = None
    stow_limits: StowLimits = field(default_factory=StowLimits)
    # PACS sources (api/routers/pull.py): what they are, and a study-level C-FIND / QIDO-RS by source name
    # (answers without patient data). None: querying is not available (an API without the node).
    sources: list[SourceInfo] = field(default_factory=list)
    find_studies: Callable[[str, StudyQuery], list[StudyMatchInfo]] | None = None
