"""Retention on SQLite and PostgreSQL: what is purged, what is kept, and that nothing unfinished is touched.

Real spool files in a temp spool, real job queue; the clock is moved by hand (days pass in no time).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from dicom_ai_node.config import RetentionSettings
from dicom_ai_node.domain.jobs import JobKind, RetryPolicy
from dicom_ai_node.persistence import InstanceRecord, SeriesRepository, SeriesStatus
from dicom_ai_node.persistence.queue import JobQueue
from dicom_ai_node.store.retention import RetentionSweep
from dicom_ai_node.store.spool import RESULTS, Spool
from tests.contract.conftest import FakeClock
from tests.support.payloads import infer_payload

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
STUDY = "1.2.826.0.1.3680043.8.498.1"
DAY = 86400.0


class Node:
    """Repository, queue and spool sharing one clock, with helpers that play the node's stages."""

    def __init__(self, engine: sa.Engine, clock: FakeClock, root: Path) -> None:
        self.clock = clock
        self.repo = SeriesRepository(engine, clock=clock)
        self.queue = JobQueue(engine, RetryPolicy(base_s=1, cap_s=2, max_attempts=1), clock=clock)
        self.spool = Spool(root)

    def receive(self, series_uid: str, count: int = 3) -> list[Path]:
        paths = []
        for n in range(count):
            relative = self.spool.write_bytes(b"DICM" * 64)
            self.repo.record_instance(
                InstanceRecord(
                    sop_instance_uid=f"{series_uid}.{n + 1}",
                    sop_class_uid=CT_IMAGE,
                    series_instance_uid=series_uid,
                    study_instance_uid=STUDY,
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    spool_path=relative,
                    size_bytes=256,
                    modality="CT",
                )
            )
            paths.append(self.spool.path(relative))
        return paths

    def route_and_run(self, series_uid: str, outcome: str = "succeeded") -> tuple[int, Path]:
        """Route the series, run its infer job to `outcome` (succeeded | dead | queued), store one SEG."""
        row = self.repo.get_series(series_uid)
        assert row is not None
        assert self.repo.claim_series_for_routing(series_uid, row.generation, row.last_received_at)
        job_id = self.queue.enqueue(
            JobKind.INFER,
            infer_payload(series_instance_uid=series_uid, model="ct-lung"),
            lock_key=f"series:{series_uid}",
        )
        assert self.repo.mark_series(
            series_uid, SeriesStatus.ROUTED, "ct-chest-lungs", generation=row.generation
        )
        relative = self.spool.write_bytes(b"SEG" * 100, area=RESULTS)
        self.repo.add_result(
            job_id=job_id,
            source_series_instance_uid=series_uid,
            kind="SEG",
            sop_class_uid=SEG_STORAGE,
            sop_instance_uid=f"{series_uid}.900",
            series_instance_uid=f"{series_uid}.90",
            study_instance_uid=STUDY,
            spool_path=relative,
        )
        if outcome != "queued":
            job = self.queue.claim("w1", [JobKind.INFER], lease_s=60)
            assert job is not None and job.id == job_id
            if outcome == "succeeded":
                self.queue.succeed(job_id, "w1", {})
            else:
                self.queue.fail(job_id, "w1", "model refused the series", permanent=True)
        return job_id, self.spool.path(relative)


@pytest.fixture
def node(engine: sa.Engine, clock: FakeClock, tmp_path: Path) -> Node:
    return Node(engine, clock, tmp_path / "spool")


def sweep(node: Node, days: float = 7, dead_days: float = 30) -> RetentionSweep:
    return RetentionSweep(
        node.repo, node.spool, RetentionSettings(days=days, dead_days=dead_days), clock=node.clock
    )


def test_finished_series_is_purged_after_the_retention_period(node: Node) -> None:
    images = node.receive("1.2.3.1")
    _, seg = node.route_and_run("1.2.3.1")
    node.clock.advance(6.9 * DAY)
    assert sweep(node).run_once().series == 0  # not yet
    assert all(p.is_file() for p in [*images, seg])

    node.clock.advance(0.2 * DAY)
    report = sweep(node).run_once()
    assert (report.series, report.files) == (1, 4) and report.bytes == 3 * 256 + 300
    assert not any(p.exists() for p in [*images, seg])
    row = node.repo.get_series("1.2.3.1")
    assert row is not None and row.status == SeriesStatus.PURGED and row.instance_count == 0
    assert "retention" in row.route_note
    assert node.repo.instances_of_series("1.2.3.1") == []
    # Result rows stay (UIDs for idempotent re-runs and revision chains); the job history stays.
    assert [r.sop_instance_uid for r in node.repo.results_of_series("1.2.3.1")] == ["1.2.3.1.900"]
    assert len(node.queue.list_jobs()) == 1
    assert sweep(node).run_once().series == 0  # idempotent


def test_unfinished_and_dead_letter_series_are_kept(node: Node) -> None:
    receiving = node.receive("1.2.3.2")
    dead = node.receive("1.2.3.4")
    node.route_and_run("1.2.3.4", outcome="dead")
    queued = node.receive("1.2.3.3")
    node.route_and_run("1.2.3.3", outcome="queued")
    node.clock.advance(10 * DAY)
    assert sweep(node).run_once().series == 0
    assert all(p.is_file() for p in [*receiving, *queued, *dead])
    assert node.repo.get_series("1.2.3.2").status == SeriesStatus.RECEIVING  # type: ignore[union-attr]

    node.clock.advance(21 * DAY)  # past dead_days: the dead-letter series goes, the others stay
    assert sweep(node).run_once().series == 1
    assert not any(p.exists() for p in dead)
    assert all(p.is_file() for p in [*receiving, *queued])


def test_days_zero_keeps_everything(node: Node) -> None:
    images = node.receive("1.2.3.5")
    node.route_and_run("1.2.3.5")
    node.clock.advance(3650 * DAY)
    assert sweep(node, days=0, dead_days=0).run_once().series == 0
    assert all(p.is_file() for p in images)


def test_a_late_instance_after_listing_wins_over_the_purge(node: Node) -> None:
    images = node.receive("1.2.3.6")
    node.route_and_run("1.2.3.6")
    node.clock.advance(8 * DAY)
    (listed,) = node.repo.purgeable_series(node.clock.now - timedelta(days=7), node.clock.now)
    late = node.receive("1.2.3.6", count=4)[-1]  # instance 4 re-opens the series (generation 2)
    assert node.repo.purge_series(listed) is None
    assert all(p.is_file() for p in [*images, late])
    row = node.repo.get_series("1.2.3.6")
    assert row is not None and row.status == SeriesStatus.RECEIVING and row.generation == 2


def test_a_purged_series_sent_again_is_received_as_new(node: Node) -> None:
    node.receive("1.2.3.7")
    node.route_and_run("1.2.3.7")
    node.clock.advance(8 * DAY)
    assert sweep(node).run_once().series == 1
    again = node.receive("1.2.3.7")  # same SOP Instance UIDs: not dropped as duplicates
    assert all(p.is_file() for p in again)
    row = node.repo.get_series("1.2.3.7")
    assert row is not None and (row.status, row.instance_count, row.generation) == (
        SeriesStatus.RECEIVING,
        3,
        2,
    )
    assert len(node.repo.instances_of_series("1.2.3.7")) == 3


def test_dead_days_shorter_than_days_is_refused() -> None:
    with pytest.raises(ValueError, match="dead_days"):
        RetentionSettings(days=7, dead_days=1)
    assert RetentionSettings(days=0, dead_days=0).days == 0  # off: dead_days does not matter
