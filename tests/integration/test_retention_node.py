"""Retention in the running node's terms: the scheduled sweep, and what jobs say about a purged series."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from dicom_ai_node.config import NodeSettings, RetentionSettings
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.domain.jobs import JobKind, JobStatus
from dicom_ai_node.node import build_scheduler, build_services, build_workers
from dicom_ai_node.persistence import InstanceRecord, SeriesStatus
from dicom_ai_node.store.retention import RetentionSweep


def test_the_node_schedules_retention_unless_it_is_off(node_settings: NodeSettings) -> None:
    services = build_services(node_settings, migrate="upgrade")
    job = build_scheduler(services).get_job("retention")
    assert job is not None and job.trigger.interval == timedelta(hours=1)  # defaults: 7 days, hourly
    off = build_services(
        node_settings.model_copy(update={"retention": RetentionSettings(days=0, dead_days=0)})
    )
    assert build_scheduler(off).get_job("retention") is None
    assert build_scheduler(services, completion_sweep=False).get_job("retention") is None  # worker-only


def test_infer_job_of_a_purged_series_says_to_send_it_again(
    node_settings: NodeSettings, tmp_path: Path
) -> None:
    services = build_services(node_settings, migrate="upgrade")
    series_uid = "1.2.826.0.1.3680043.8.498.77"
    for n, path in enumerate(write_ct_series(tmp_path / "ct", n_slices=3)):
        relative = services.spool.commit_file(path)
        services.repo.record_instance(
            InstanceRecord(
                sop_instance_uid=f"{series_uid}.{n + 1}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                series_instance_uid=series_uid,
                study_instance_uid="1.2.826.0.1.3680043.8.498.7",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                spool_path=relative,
                size_bytes=1000,
            ),
            now=datetime.now(UTC) - timedelta(days=9),
        )
    services.repo.mark_series(series_uid, SeriesStatus.ROUTED, "ct-chest-lungs")
    report = RetentionSweep(services.repo, services.spool, node_settings.retention).run_once()
    assert report.series == 1 and report.files == 3

    job_id = services.queue.enqueue(
        JobKind.INFER,
        {
            "series_instance_uid": series_uid,
            "study_instance_uid": "1.2.3",
            "model": "ct-lung",
            "rule_id": "ct-chest-lungs",
            "rule_version": 2,
            "destinations": [],
            "generation": 1,
        },
    )
    [worker] = build_workers(services, [JobKind.INFER])
    worker.run_one()
    job = services.queue.get(job_id)
    assert job is not None and job.status == JobStatus.DEAD
    assert "removed by retention" in (job.last_error or "") and "send the series again" in (
        job.last_error or ""
    )
