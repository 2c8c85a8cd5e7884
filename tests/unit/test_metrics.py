"""NodeMetrics: families, observe_* counters, queue gauges read at scrape time, failing sources, no UIDs."""

from __future__ import annotations

import logging
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicom_ai_node.domain.jobs import JobKind, JobStatus, QueueStats
from dicom_ai_node.domain.payloads import DeliverPayload
from dicom_ai_node.errors import PermanentDeliveryError, TransientDeliveryError
from dicom_ai_node.metrics import CONTENT_TYPE, NodeMetrics, start_metrics_server, status_label
from dicom_ai_node.persistence.db import create_schema, make_engine
from dicom_ai_node.persistence.queue import Job, JobQueue
from dicom_ai_node.worker.runner import JobHandler, Worker
from tests.support.payloads import infer_payload

FAMILIES = [
    "ainode_instances_received",
    "ainode_received_bytes",
    "ainode_cstore_responses",
    "ainode_jobs",
    "ainode_queue_depth",
    "ainode_queue_oldest_age_seconds",
    "ainode_stage_duration_seconds",
    "ainode_delivery_duration_seconds",
    "ainode_receive_to_delivered_seconds",
    "ainode_delivery_failures",
    "ainode_deliveries_unverified",
    "ainode_jobs_finished",
    "ainode_scrape_errors",
]

UID_LIKE = re.compile(r"^\d+(\.\d+){2,}$")


def _counts() -> dict[str, int]:
    return {"infer/queued": 2, "infer/running": 1, "deliver/dead": 3}


def _stats() -> dict[str, QueueStats]:
    return {"infer": QueueStats(3, 12.5), "deliver": QueueStats(0, 0.0)}


def _families(metrics: NodeMetrics) -> dict[str, object]:
    # The text format also carries a `<name>_created` gauge per counter/histogram: not ours to check.
    text = metrics.render().decode()
    return {f.name: f for f in text_string_to_metric_families(text) if not f.name.endswith("_created")}


def test_render_has_every_family_and_parses() -> None:
    metrics = NodeMetrics(job_counts=_counts, queue_stats=_stats)
    metrics.observe_store(0x0000, 10)
    metrics.observe_stage("load", "ct-lung", 0.2)
    metrics.observe_delivery("pacs", 1.0, ok=True)
    metrics.observe_delivery("pacs", 1.0, ok=False)
    metrics.observe_receive_to_delivered(42.0)
    metrics.observe_job_finished("infer", "succeeded")
    assert sorted(_families(metrics)) == sorted(FAMILIES)
    assert CONTENT_TYPE.startswith("text/plain")


def test_observe_store_counts_status_and_only_successful_instances() -> None:
    metrics = NodeMetrics()
    value = metrics.registry.get_sample_value
    metrics.observe_store(0x0000, 1000)
    metrics.observe_store(0x0000, 500)
    metrics.observe_store(0xA700, 0)
    metrics.observe_store(0xC210, 0)
    assert value("ainode_cstore_responses_total", {"status": "0x0000"}) == 2
    assert value("ainode_cstore_responses_total", {"status": "0xA700"}) == 1
    assert value("ainode_cstore_responses_total", {"status": "0xC210"}) == 1
    assert value("ainode_instances_received_total") == 2
    assert value("ainode_received_bytes_total") == 1500


def test_status_label_is_upper_case_hex() -> None:
    assert [status_label(s) for s in (0, 0xA700, 0xC211, 0xB000)] == ["0x0000", "0xA700", "0xC211", "0xB000"]


def test_stage_delivery_latency_and_job_observations() -> None:
    metrics = NodeMetrics()
    value = metrics.registry.get_sample_value
    metrics.observe_stage("infer", "ct-lung", 3.0)
    metrics.observe_stage("infer", "ct-lung", 0.04)
    metrics.observe_stage("encode", "mr-brain", 0.5)
    assert value("ainode_stage_duration_seconds_count", {"stage": "infer", "model": "ct-lung"}) == 2
    assert value("ainode_stage_duration_seconds_sum", {"stage": "infer", "model": "ct-lung"}) == 3.04
    assert (
        value("ainode_stage_duration_seconds_bucket", {"stage": "infer", "model": "ct-lung", "le": "0.05"})
        == 1
    )
    assert (
        value("ainode_stage_duration_seconds_bucket", {"stage": "infer", "model": "ct-lung", "le": "1800.0"})
        == 2
    )
    assert value("ainode_stage_duration_seconds_count", {"stage": "encode", "model": "mr-brain"}) == 1

    metrics.observe_delivery("pacs", 2.0, ok=True)
    metrics.observe_delivery("pacs", 9.0, ok=False)
    metrics.observe_delivery("archive", 9.0, ok=False)
    assert value("ainode_delivery_duration_seconds_count", {"destination": "pacs"}) == 1
    assert value("ainode_delivery_failures_total", {"destination": "pacs"}) == 1
    assert value("ainode_delivery_failures_total", {"destination": "archive"}) == 1

    metrics.observe_receive_to_delivered(30.0)
    metrics.observe_receive_to_delivered(-0.5)  # clock skew between processes: counted as 0, not negative
    assert value("ainode_receive_to_delivered_seconds_count") == 2
    assert value("ainode_receive_to_delivered_seconds_sum") == 30.0
    assert value("ainode_receive_to_delivered_seconds_bucket", {"le": "3600.0"}) == 2

    metrics.observe_job_finished("deliver", "succeeded")
    metrics.observe_job_finished("deliver", "dead")
    assert value("ainode_jobs_finished_total", {"kind": "deliver", "status": "succeeded"}) == 1
    assert value("ainode_jobs_finished_total", {"kind": "deliver", "status": "dead"}) == 1


def test_queue_gauges_are_read_at_every_scrape() -> None:
    counts = _counts()
    metrics = NodeMetrics(job_counts=lambda: counts, queue_stats=_stats)
    value = metrics.registry.get_sample_value
    assert value("ainode_jobs", {"kind": "infer", "status": "queued"}) == 2
    assert value("ainode_jobs", {"kind": "deliver", "status": "dead"}) == 3
    assert value("ainode_queue_depth", {"kind": "infer"}) == 3
    assert value("ainode_queue_oldest_age_seconds", {"kind": "infer"}) == 12.5
    assert value("ainode_queue_depth", {"kind": "deliver"}) == 0
    counts["infer/queued"] = 7
    assert value("ainode_jobs", {"kind": "infer", "status": "queued"}) == 7


def test_a_failing_source_costs_its_families_not_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict[str, int]:
        raise RuntimeError("database is locked")

    metrics = NodeMetrics(job_counts=broken, queue_stats=_stats)
    metrics.observe_store(0x0000, 1)
    with caplog.at_level(logging.WARNING, logger="dicom_ai_node.metrics"):
        first = _families(metrics)
        second = _families(metrics)
    assert "ainode_jobs" not in first and "ainode_jobs" not in second
    assert "ainode_queue_depth" in second and "ainode_instances_received" in second
    assert metrics.registry.get_sample_value("ainode_scrape_errors_total", {"source": "job_counts"}) == 3
    assert metrics.registry.get_sample_value("ainode_scrape_errors_total", {"source": "queue_stats"}) == 0
    # One warning per outage, not one per scrape.
    assert [r.getMessage() for r in caplog.records].count(
        "metrics: job_counts failed at scrape, its gauges are left out: database is locked"
    ) == 1


def test_registering_does_not_call_the_sources() -> None:
    def must_not_run() -> dict[str, int]:
        raise AssertionError("called at registration")

    NodeMetrics(job_counts=must_not_run)


def test_two_nodes_in_one_process_keep_separate_counts() -> None:
    a, b = NodeMetrics(), NodeMetrics()
    a.observe_store(0, 10)
    assert a.registry.get_sample_value("ainode_instances_received_total") == 1
    assert b.registry.get_sample_value("ainode_instances_received_total") == 0


def _queue(tmp_path: Path) -> JobQueue:
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    create_schema(engine)
    return JobQueue(engine)


def test_queue_counts_of_a_real_queue_and_the_worker_counts_finished_jobs(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    metrics = NodeMetrics(job_counts=queue.counts)

    def deliver(job: Job, payload: DeliverPayload) -> dict[str, Any]:
        # The destination's name says how its delivery ends.
        if payload.destination == "permanent":
            raise PermanentDeliveryError("refused")
        if payload.destination == "transient":
            raise TransientDeliveryError("unreachable")
        return {}

    for outcome in ("ok", "permanent", "transient"):
        queue.enqueue(JobKind.DELIVER, DeliverPayload(destination=outcome, files=[]), max_attempts=3)
    worker = Worker(
        queue,
        {JobKind.DELIVER: JobHandler(DeliverPayload, deliver)},
        [JobKind.DELIVER],
        lease_s=30,
        heartbeat_s=10,
        poll_interval_s=0.1,
        metrics=metrics,
    )
    value = metrics.registry.get_sample_value
    assert value("ainode_jobs", {"kind": "deliver", "status": "queued"}) == 3
    while worker.run_one() is not None:
        pass
    for status, n in ((JobStatus.SUCCEEDED, 1), (JobStatus.DEAD, 1), (JobStatus.FAILED, 1)):
        assert value("ainode_jobs_finished_total", {"kind": "deliver", "status": status.value}) == n
        assert value("ainode_jobs", {"kind": "deliver", "status": status.value}) == n
    assert value("ainode_jobs", {"kind": "deliver", "status": "queued"}) == 0


def test_no_label_value_looks_like_a_uid(tmp_path: Path) -> None:
    queue = _queue(tmp_path)
    queue.enqueue(
        JobKind.INFER, infer_payload(series_instance_uid="1.2.826.0.1.3680043.8.498.1", model="ct-lung")
    )
    metrics = NodeMetrics(job_counts=queue.counts, queue_stats=_stats)
    metrics.observe_store(0x0000, 100)
    metrics.observe_stage("load", "ct-lung", 0.1)
    metrics.observe_delivery("pacs", 0.1, ok=True)
    metrics.observe_job_finished("infer", "succeeded")
    values = [v for labels in metrics.sample_labels() for k, v in labels.items() if k != "le"]
    assert values and not [v for v in values if UID_LIKE.match(v)]


def test_metrics_server_serves_the_registry() -> None:
    metrics = NodeMetrics()
    metrics.observe_store(0x0000, 123)
    server, thread = start_metrics_server(metrics, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = resp.read().decode()
        assert "ainode_received_bytes_total 123.0" in body
    finally:
        server.shutdown()
        thread.join(timeout=5)
