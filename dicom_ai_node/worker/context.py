"""What the infer and deliver stages share: settings, repositories, the spool and the inference host.

Its own module so the stages (worker/stages.py) and the result encoding they call (worker/outputs.py)
both depend on it without depending on each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.infer.host import InferenceHost
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.persistence.audit import AuditLog
from dicom_ai_node.persistence.queue import JobQueue
from dicom_ai_node.persistence.repository import SeriesRepository
from dicom_ai_node.store.spool import Spool


@dataclass
class StageContext:
    settings: NodeSettings
    repo: SeriesRepository
    queue: JobQueue
    spool: Spool
    inference: InferenceHost
    software_version: str
    metrics: NodeMetrics | None = None
    # "dicom.instances_transferred" events of deliver jobs (worker/audit.py); None: not audited.
    audit: AuditLog | None = None
