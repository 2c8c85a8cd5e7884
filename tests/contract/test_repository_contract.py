"""Series repository contract: identical behaviour on SQLite and PostgreSQL (see conftest.engine)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta

import pytest
import sqlalchemy as sa

from dicom_ai_node.persistence import InstanceRecord, SeriesRepository, SeriesStatus
from tests.contract.conftest import FakeClock

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
SERIES = "1.2.826.0.1.3680043.8.498.100"
STUDY = "1.2.826.0.1.3680043.8.498.1"
_S = timedelta(seconds=1)


def instance(n: int, series_uid: str = SERIES) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"{series_uid}.{n}",
        sop_class_uid=CT_IMAGE,
        series_instance_uid=series_uid,
        study_instance_uid=STUDY,
        transfer_syntax_uid=EXPLICIT_LE,
        spool_path=f"ab/cd/{n:08x}.dcm",
        size_bytes=1000 + n,
        calling_ae="MODALITY1",
        modality="CT",
        body_part_examined="CHEST",
        series_description="Thorax 1.0 B31f",
        header={"SliceThickness": 1.0, "Rows": 512, "Columns": 512, "ImagesInAcquisition": 3},
    )


@pytest.fixture
def repo(engine: sa.Engine, clock: FakeClock) -> SeriesRepository:
    return SeriesRepository(engine, clock=clock)


def test_first_instance_creates_the_series(repo: SeriesRepository, clock: FakeClock) -> None:
    assert repo.record_instance(instance(1)) is True
    s = repo.get_series(SERIES)
    assert s is not None
    assert (s.status, s.generation, s.instance_count) == (SeriesStatus.RECEIVING, 1, 1)
    assert s.first_received_at == s.last_received_at == clock.now
    assert (s.modality, s.body_part_examined, s.calling_ae, s.sop_class_uid) == (
        "CT",
        "CHEST",
        "MODALITY1",
        CT_IMAGE,
    )
    assert s.header == {"SliceThickness": 1.0, "Rows": 512, "Columns": 512, "ImagesInAcquisition": 3}
    (row,) = repo.instances_of_series(SERIES)
    assert (row.sop_instance_uid, row.spool_path, row.size_bytes) == (
        f"{SERIES}.1",
        "ab/cd/00000001.dcm",
        1001,
    )
    assert row.received_at == clock.now
    assert repo.get_series("9.9.9") is None


def test_duplicate_instance_is_stored_once(repo: SeriesRepository, clock: FakeClock) -> None:
    assert repo.record_instance(instance(1))
    first_seen = clock.now
    clock.advance(5)
    assert repo.record_instance(replace(instance(1), spool_path="other.dcm")) is False
    s = repo.get_series(SERIES)
    assert s is not None and s.instance_count == 1 and s.last_received_at == first_seen
    assert [i.spool_path for i in repo.instances_of_series(SERIES)] == ["ab/cd/00000001.dcm"]


def test_instances_are_listed_in_arrival_order(repo: SeriesRepository, clock: FakeClock) -> None:
    for n in (3, 1, 2):
        repo.record_instance(instance(n))
        clock.advance(0.001)
    s = repo.get_series(SERIES)
    assert s is not None and s.instance_count == 3 and s.last_received_at == clock.now - 0.001 * _S
    assert [i.sop_instance_uid[-1] for i in repo.instances_of_series(SERIES)] == ["3", "1", "2"]


def test_concurrent_receivers_count_every_unique_instance(repo: SeriesRepository) -> None:
    # 8 SCP threads, 3 series, every instance sent twice.
    records = [instance(n, f"{SERIES}.{n % 3}") for n in range(60)] * 2
    with ThreadPoolExecutor(8) as pool:
        stored = list(pool.map(repo.record_instance, records))
    assert stored.count(True) == 60
    for k in range(3):
        s = repo.get_series(f"{SERIES}.{k}")
        assert s is not None and s.instance_count == 20 and s.generation == 1
        assert len(repo.instances_of_series(f"{SERIES}.{k}")) == 20


def test_due_series_and_routing_claim(repo: SeriesRepository, clock: FakeClock) -> None:
    repo.record_instance(instance(1, "1.1"))
    clock.advance(10)
    repo.record_instance(instance(1, "2.2"))
    quiet_start = clock.now - 5 * _S

    due = repo.due_series(older_than=quiet_start)
    assert [s.series_instance_uid for s in due] == ["1.1"]
    s = due[0]
    # A stale view (an instance arrived after the sweep looked) does not claim.
    assert repo.claim_series_for_routing("1.1", s.generation + 1, s.last_received_at) is False
    assert repo.claim_series_for_routing("1.1", s.generation, s.last_received_at + _S) is False
    assert repo.claim_series_for_routing("1.1", s.generation, s.last_received_at) is True
    assert repo.claim_series_for_routing("1.1", s.generation, s.last_received_at) is False
    claimed = repo.get_series("1.1")
    assert claimed is not None and claimed.status is SeriesStatus.ROUTING
    assert claimed.routing_started_at == clock.now
    assert repo.due_series(older_than=clock.now) == [repo.get_series("2.2")]


def test_concurrent_sweeps_route_a_series_once(repo: SeriesRepository, clock: FakeClock) -> None:
    repo.record_instance(instance(1))
    clock.advance(30)
    (s,) = repo.due_series(older_than=clock.now)
    with ThreadPoolExecutor(8) as pool:
        wins = list(
            pool.map(
                lambda _: repo.claim_series_for_routing(SERIES, s.generation, s.last_received_at), range(16)
            )
        )
    assert wins.count(True) == 1


def test_instance_arriving_mid_sweep_defers_routing(repo: SeriesRepository, clock: FakeClock) -> None:
    repo.record_instance(instance(1))
    clock.advance(30)
    (seen,) = repo.due_series(older_than=clock.now)
    repo.record_instance(instance(2))  # arrives between the sweep's read and its claim
    assert repo.claim_series_for_routing(SERIES, seen.generation, seen.last_received_at) is False
    s = repo.get_series(SERIES)
    assert s is not None and s.status is SeriesStatus.RECEIVING and s.generation == 1


def test_late_instance_bumps_generation(repo: SeriesRepository, clock: FakeClock) -> None:
    repo.record_instance(instance(1))
    clock.advance(30)
    (s,) = repo.due_series(older_than=clock.now)
    assert repo.claim_series_for_routing(SERIES, s.generation, s.last_received_at)
    assert repo.mark_series(SERIES, SeriesStatus.ROUTED, "rule ct-lung v3 -> lung-seg 1.0", generation=1)
    routed = repo.get_series(SERIES)
    assert routed is not None and routed.status is SeriesStatus.ROUTED
    assert routed.routed_at == clock.now and routed.route_note == "rule ct-lung v3 -> lung-seg 1.0"

    clock.advance(600)
    assert repo.record_instance(instance(2)) is True
    late = repo.get_series(SERIES)
    assert late is not None
    assert (late.status, late.generation, late.instance_count) == (SeriesStatus.RECEIVING, 2, 2)
    assert late.last_received_at == clock.now
    # More instances of the same late burst stay in generation 2.
    assert repo.record_instance(instance(3)) is True
    again = repo.get_series(SERIES)
    assert again is not None and again.generation == 2 and again.instance_count == 3


def test_late_instance_during_routing_is_not_hidden(repo: SeriesRepository, clock: FakeClock) -> None:
    repo.record_instance(instance(1))
    clock.advance(30)
    (s,) = repo.due_series(older_than=clock.now)
    assert repo.claim_series_for_routing(SERIES, s.generation, s.last_received_at)
    repo.record_instance(instance(2))  # arrives while the sweep is routing generation 1
    assert repo.mark_series(SERIES, SeriesStatus.ROUTED, generation=1) is False
    after = repo.get_series(SERIES)
    assert after is not None and after.status is SeriesStatus.RECEIVING and after.generation == 2
    assert repo.mark_series(SERIES, "failed", "header unreadable") is True  # unguarded form
    failed = repo.get_series(SERIES)
    assert failed is not None and failed.status is SeriesStatus.FAILED and failed.routed_at is None


def test_stalled_routing_goes_back_to_receiving(repo: SeriesRepository, clock: FakeClock) -> None:
    repo.record_instance(instance(1))
    (s,) = repo.due_series(older_than=clock.now)
    assert repo.claim_series_for_routing(SERIES, s.generation, s.last_received_at)
    assert repo.requeue_stalled_routing(older_than=clock.now - _S) == 0
    clock.advance(120)
    assert repo.requeue_stalled_routing(older_than=clock.now - 60 * _S) == 1
    back = repo.get_series(SERIES)
    assert back is not None and back.status is SeriesStatus.RECEIVING and back.generation == 1
    assert repo.requeue_stalled_routing(older_than=clock.now) == 0


def test_completion_signal_holds_until_the_next_instance(repo: SeriesRepository, clock: FakeClock) -> None:
    """The sender's completion signal (issue 13): the series' last_received_at, copied in the database."""
    other = SERIES + ".2"
    repo.record_instance(instance(1))
    repo.record_instance(instance(1, other))
    assert repo.signal_series_complete([SERIES, "1.2.3.4.unknown"]) == 1
    (signalled,) = repo.signalled_series()
    assert signalled.series_instance_uid == SERIES and signalled.complete_signalled
    assert signalled.complete_signalled_at == signalled.last_received_at
    clock.advance(1)
    repo.record_instance(instance(2))  # a later instance voids the signal
    assert repo.signalled_series() == [] and not repo.get_series(SERIES).complete_signalled  # type: ignore[union-attr]
    routed = repo.get_series(other)
    assert routed is not None
    assert repo.claim_series_for_routing(other, routed.generation, routed.last_received_at)
    repo.mark_series(other, SeriesStatus.ROUTED, generation=routed.generation)
    assert repo.signal_series_complete([other]) == 0  # routed: nothing to signal


def test_list_series_by_status(repo: SeriesRepository, clock: FakeClock) -> None:
    for uid in ("1.1", "2.2", "3.3"):
        repo.record_instance(instance(1, uid))
        clock.advance(1)
    repo.mark_series("2.2", SeriesStatus.UNMATCHED, "no rule matched")
    assert [s.series_instance_uid for s in repo.list_series()] == ["3.3", "2.2", "1.1"]
    assert [s.series_instance_uid for s in repo.list_series(status="receiving")] == ["3.3", "1.1"]
    assert [s.series_instance_uid for s in repo.list_series(limit=1)] == ["3.3"]
    unmatched = repo.get_series("2.2")
    assert unmatched is not None and unmatched.routed_at == clock.now


def test_add_result_is_idempotent_on_sop_instance_uid(repo: SeriesRepository) -> None:
    def add(job_id: int, sop_instance_uid: str, kind: str, path: str) -> int:
        return repo.add_result(
            job_id=job_id,
            source_series_instance_uid=SERIES,
            kind=kind,  # type: ignore[arg-type]
            sop_class_uid=SEG_STORAGE,
            sop_instance_uid=sop_instance_uid,
            series_instance_uid="2.25.77",
            study_instance_uid=STUDY,
            spool_path=path,
        )

    seg = add(1, "2.25.1", "SEG", "r/seg-1.dcm")
    sr = add(1, "2.25.2", "SR", "r/sr-1.dcm")
    # The job is re-run (same deterministic UIDs): rows are updated, not duplicated.
    assert add(2, "2.25.1", "SEG", "r/seg-2.dcm") == seg
    assert add(2, "2.25.2", "SR", "r/sr-2.dcm") == sr
    rows = repo.results_of_series(SERIES)
    assert [(r.sop_instance_uid, r.kind, r.job_id, r.spool_path) for r in rows] == [
        ("2.25.1", "SEG", 2, "r/seg-2.dcm"),
        ("2.25.2", "SR", 2, "r/sr-2.dcm"),
    ]
    assert [r.id for r in repo.results_of_job(2)] == [seg, sr]
    assert repo.results_of_job(1) == []
    with pytest.raises(ValueError):
        add(3, "2.25.3", "PDF", "x")
