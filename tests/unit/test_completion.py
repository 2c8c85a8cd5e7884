"""Completion sweep + routing against a real SQLite database, with a controlled clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicom_ai_node.domain.jobs import JobKind
from dicom_ai_node.persistence.db import create_schema, make_engine
from dicom_ai_node.persistence.queue import JobQueue
from dicom_ai_node.persistence.repository import InstanceRecord, SeriesRepository, SeriesStatus
from dicom_ai_node.route.completion import CompletionSweep, expected_instance_count
from dicom_ai_node.rules_file import load_rules

RULES = load_rules(Path(__file__).parents[2] / "config" / "rules.yaml")
T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    create_schema(engine)
    clock = Clock()
    repo = SeriesRepository(engine, clock=clock)
    queue = JobQueue(engine, clock=clock)
    sweep = CompletionSweep(repo, queue, lambda: RULES, default_quiet_s=5, clock=clock)
    return repo, queue, sweep, clock


def _receive(
    repo: SeriesRepository, series: str, n: int, modality: str = "CT", start: int = 0, **header: object
) -> None:
    for i in range(start, start + n):
        repo.record_instance(
            InstanceRecord(
                sop_instance_uid=f"{series}.{i}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                series_instance_uid=series,
                study_instance_uid="1.2.3",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                spool_path=f"x/{series}.{i}",
                size_bytes=1,
                calling_ae="ORTHANC",
                modality=modality,
                body_part_examined="CHEST",
                series_description="CHEST CT",
                header={"Modality": modality, **header},
            )
        )


def test_series_waits_for_quiet_period_then_routes_once(env) -> None:  # type: ignore[no-untyped-def]
    repo, queue, sweep, clock = env
    _receive(repo, "1.9.1", 30)
    clock.now = T0 + timedelta(seconds=3)
    assert sweep.run_once().routed == 0
    clock.now = T0 + timedelta(seconds=6)
    stats = sweep.run_once()
    assert stats.routed == 1 and stats.jobs == 1
    assert sweep.run_once().routed == 0  # idempotent
    [job] = queue.list_jobs()
    assert job.kind == JobKind.INFER
    assert job.payload["model"] == "ct-lung" and job.payload["rule_id"] == "ct-chest-lungs"
    assert job.payload["generation"] == 1 and job.payload["destinations"] == ["pacs"]
    row = repo.get_series("1.9.1")
    assert row.status == SeriesStatus.ROUTED and "ct-chest-lungs v2" in row.route_note


def test_unmatched_series_is_recorded_not_an_error(env) -> None:  # type: ignore[no-untyped-def]
    repo, queue, sweep, clock = env
    _receive(repo, "1.9.2", 1, modality="CR")
    clock.now = T0 + timedelta(seconds=10)
    assert sweep.run_once().unmatched == 1
    assert repo.get_series("1.9.2").status == SeriesStatus.UNMATCHED
    assert queue.list_jobs() == []


def test_late_instance_opens_a_new_generation_and_a_new_job(env) -> None:  # type: ignore[no-untyped-def]
    repo, queue, sweep, clock = env
    _receive(repo, "1.9.3", 25)
    clock.now = T0 + timedelta(seconds=10)
    sweep.run_once()
    clock.now = T0 + timedelta(seconds=20)
    _receive(repo, "1.9.3", 1, start=25)
    assert repo.get_series("1.9.3").generation == 2
    clock.now = T0 + timedelta(seconds=26)
    sweep.run_once()
    jobs = sorted(queue.list_jobs(), key=lambda j: j.id)
    assert [j.payload["generation"] for j in jobs] == [1, 2]
    assert jobs[0].dedupe_key != jobs[1].dedupe_key


def test_expected_count_shortens_the_wait(env) -> None:  # type: ignore[no-untyped-def]
    repo, queue, sweep, clock = env
    _receive(repo, "1.9.4", 24, ImagesInAcquisition=24)
    clock.now = T0 + timedelta(seconds=1.5)
    assert sweep.run_once().routed == 1


def test_new_instance_during_wait_restarts_the_quiet_period(env) -> None:  # type: ignore[no-untyped-def]
    repo, queue, sweep, clock = env
    _receive(repo, "1.9.5", 24)
    clock.now = T0 + timedelta(seconds=4)
    _receive(repo, "1.9.5", 1, start=24)
    clock.now = T0 + timedelta(seconds=6)
    assert sweep.run_once().routed == 0
    clock.now = T0 + timedelta(seconds=9.5)
    assert sweep.run_once().routed == 1
    assert queue.list_jobs()[0].payload["generation"] == 1


def test_two_sweepers_route_a_series_once(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo, queue, sweep, clock = env
    other = CompletionSweep(repo, queue, lambda: RULES, default_quiet_s=5, clock=clock)
    _receive(repo, "1.9.6", 30)
    clock.now = T0 + timedelta(seconds=10)
    assert sweep.run_once().routed + other.run_once().routed == 1
    assert len(queue.list_jobs()) == 1


# -- completion signals (issue 13): the sender's release, expected counts, the quiet period as fallback ---


def test_signalled_series_routes_at_once(env) -> None:  # type: ignore[no-untyped-def]
    repo, queue, sweep, clock = env
    _receive(repo, "1.9.7", 30)
    assert repo.signal_series_complete(["1.9.7"]) == 1
    stats = sweep.run_once()  # same instant: no quiet period at all
    assert (stats.routed, stats.signalled, stats.quiet) == (1, 1, 0)
    row = repo.get_series("1.9.7")
    assert row.status == SeriesStatus.ROUTED and row.route_note.endswith("complete: association released")
    [job] = queue.list_jobs()
    assert job.payload["generation"] == 1


def test_signal_survives_a_restart_of_the_sweep(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Recorded in the database: a sweep of a process started after the release (a crash between
    release and routing) still routes the series at once."""
    repo, _, _, clock = env
    _receive(repo, "1.9.8", 30)
    repo.signal_series_complete(["1.9.8"])
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    fresh = CompletionSweep(
        SeriesRepository(engine, clock=clock), JobQueue(engine, clock=clock), lambda: RULES, 5, clock=clock
    )
    assert fresh.run_once().signalled == 1
    engine.dispose()


def test_an_instance_after_the_signal_voids_it(env) -> None:  # type: ignore[no-untyped-def]
    repo, queue, sweep, clock = env
    _receive(repo, "1.9.9", 30)
    repo.signal_series_complete(["1.9.9"])
    clock.now = T0 + timedelta(seconds=1)
    _receive(repo, "1.9.9", 1, start=30)  # another sender, or the same one in a new association
    assert not repo.get_series("1.9.9").complete_signalled
    clock.now = T0 + timedelta(seconds=3)
    assert sweep.run_once().waiting == 1
    clock.now = T0 + timedelta(seconds=6.5)
    stats = sweep.run_once()
    assert (stats.routed, stats.quiet) == (1, 1)
    assert repo.get_series("1.9.9").route_note.endswith("complete: quiet 5 s")


def test_late_image_after_a_signal_makes_a_revision_signalled_again(env) -> None:  # type: ignore[no-untyped-def]
    repo, queue, sweep, clock = env
    _receive(repo, "1.9.10", 30)
    repo.signal_series_complete(["1.9.10"])
    sweep.run_once()
    assert repo.signal_series_complete(["1.9.10"]) == 0  # routed: nothing left to signal
    clock.now = T0 + timedelta(seconds=20)
    _receive(repo, "1.9.10", 1, start=30)
    row = repo.get_series("1.9.10")
    assert (row.generation, row.status, row.complete_signalled) == (2, SeriesStatus.RECEIVING, False)
    assert sweep.run_once().routed == 0  # the earlier signal does not cover the late image
    assert repo.signal_series_complete(["1.9.10"]) == 1
    assert sweep.run_once().signalled == 1
    jobs = sorted(queue.list_jobs(), key=lambda j: j.id)
    assert [j.payload["generation"] for j in jobs] == [1, 2]


def test_signalled_series_is_found_behind_a_hundred_arriving_ones(env) -> None:  # type: ignore[no-untyped-def]
    repo, queue, sweep, clock = env
    for i in range(101):
        _receive(repo, f"1.8.{i}", 1)
    clock.now = T0 + timedelta(seconds=1)
    _receive(repo, "1.9.11", 30)
    repo.signal_series_complete(["1.9.11"])
    stats = sweep.run_once()
    assert (stats.signalled, stats.waiting) == (1, 100)
    assert repo.get_series("1.9.11").status == SeriesStatus.ROUTED


def test_expected_count_completes_without_waiting(env) -> None:  # type: ignore[no-untyped-def]
    repo, queue, sweep, clock = env
    _receive(repo, "1.9.12", 23, ImagesInAcquisition=24)
    assert sweep.run_once().waiting == 1
    _receive(repo, "1.9.12", 1, start=23)
    stats = sweep.run_once()
    assert (stats.routed, stats.expected) == (1, 1)
    assert repo.get_series("1.9.12").route_note.endswith("complete: 24 of 24 expected instances")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ({"ImagesInAcquisition": 24.0}, 24),  # IS arrives as float
        ({"ImagesInAcquisition": "24"}, 24),
        ({"ImagesInAcquisition": 30, "NumberOfTemporalPositions": 4}, 120),  # never early
        ({"ImagesInAcquisition": 30, "NumberOfTemporalPositions": 1}, 30),
        ({"NumberOfTemporalPositions": 4}, None),  # slices per position unknown
        ({"ImagesInAcquisition": 0}, None),
        ({"ImagesInAcquisition": "n/a"}, None),
        ({}, None),
        ({"Modality": "PT", "SeriesType": ["STATIC", "IMAGE"], "NumberOfSlices": 280}, 280),
        ({"Modality": "PT", "SeriesType": ["WHOLE BODY", "IMAGE"], "NumberOfSlices": 500}, 500),
        (
            {
                "Modality": "PT",
                "SeriesType": ["DYNAMIC", "IMAGE"],
                "NumberOfSlices": 47,
                "NumberOfTimeSlices": 6,
            },
            282,
        ),
        (
            {
                "Modality": "PT",
                "SeriesType": ["GATED", "IMAGE"],
                "NumberOfSlices": 47,
                "NumberOfTimeSlots": 8,
                "NumberOfRRIntervals": 2,
            },
            752,
        ),
        ({"Modality": "PT", "SeriesType": ["GATED", "IMAGE"], "NumberOfSlices": 47}, None),  # 1C missing
        ({"Modality": "PT", "NumberOfSlices": 47}, None),  # no SeriesType: what is a volume?
        ({"Modality": "NM", "SeriesType": ["STATIC", "IMAGE"], "NumberOfSlices": 64}, None),  # NM: frames
    ],
)
def test_expected_instance_count(header: dict[str, object], expected: int | None) -> None:
    assert expected_instance_count(header) == expected
