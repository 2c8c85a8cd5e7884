"""The `pull` job: retrieve a study from a PACS source into the spool + DB (pull/service.py).

The retrieved series are then routed by the completion sweep exactly like received ones (infer, deliver).
Progress ("retrieved 34 of 48 instances") is written to the job while it runs, at most once a second.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from dicom_ai_node.domain.payloads import PullPayload
from dicom_ai_node.persistence.audit import AuditLog
from dicom_ai_node.persistence.queue import Job, JobQueue
from dicom_ai_node.pull.service import Puller, PullProgress
from dicom_ai_node.worker.audit import audit_pulled

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0


def run_pull(
    job: Job, payload: PullPayload, puller: Puller, queue: JobQueue, audit: AuditLog | None = None
) -> dict[str, Any]:
    worker_id = job.worker_id or ""
    last = 0.0

    def progress(state: PullProgress) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_INTERVAL_S:
            last = now
            queue.set_progress(job.id, worker_id, state.as_dict())

    state = puller.pull(payload.source, payload.study_instance_uid, payload.series_instance_uid, progress)
    log.info("pull job %d: %s", job.id, state.summary())
    if audit is not None:
        audit_pulled(audit, puller.settings.ae_title, job, state)
    return state.as_dict()
