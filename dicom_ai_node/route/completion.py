"""Series completion and routing: the sweep that turns complete series into `infer` jobs.

A series is complete, first match wins:

1. when its sender said so: a peer with `series_complete_on_release` released the association that
   carried it (receive/release.py records the signal in the database, so any node process's sweep sees
   it, also after a crash), and no instance arrived since;
2. when its header gives an expected count (`expected_instance_count`) and that many instances are in;
3. otherwise when no instance arrived for its quiet period (the longest quiet period of the rules it
   matches, else the node default): the fallback for every sender.

An instance arriving after the series was routed re-opens it as a new generation (a revision), which
completes by the same rules. Every step is an idempotent, DB-guarded statement (compare-and-set on
generation + last_received_at, dedupe keys on jobs), so several node processes may run the sweep at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from dicom_ai_node.domain.jobs import JobKind
from dicom_ai_node.domain.payloads import InferPayload
from dicom_ai_node.domain.rules import Rule, RuleSet, matching_rules
from dicom_ai_node.persistence.queue import JobQueue
from dicom_ai_node.persistence.repository import SeriesRepository, SeriesRow, SeriesStatus
from dicom_ai_node.persistence.series_attrs import series_attributes

log = logging.getLogger(__name__)

# A sweep that claimed a series and died before enqueueing leaves it in 'routing'; retry after this.
STALLED_ROUTING_S = 60.0


def infer_dedupe_key(series_instance_uid: str, generation: int, rule: Rule) -> str:
    return f"infer:{series_instance_uid}:g{generation}:{rule.id}:v{rule.version}"


def _count(value: Any) -> int | None:
    """A positive integer count from a header value (IS arrives as float, US as int), else None."""
    try:
        number = int(float(value))
    except (TypeError, ValueError, OverflowError):
        return None
    return number if number > 0 else None


def expected_instance_count(header: Mapping[str, Any], modality: str = "") -> int | None:
    """How many instances the series will hold when its (first instance's) header says so, else None.

    - ImagesInAcquisition (0020,1002), times NumberOfTemporalPositions (0020,0105) when that is above 1:
      vendors differ on whether a dynamic acquisition's ImagesInAcquisition counts one temporal position
      or all of them, and the product is never reached early (at worst the quiet period decides).
      NumberOfTemporalPositions alone says nothing about the slices per position: no count.
    - PET (Modality PT), PET Series module (PS3.3 C.8.9.1): NumberOfSlices (0054,0081) per volume, times
      NumberOfTimeSlices (0054,0101) for SeriesType DYNAMIC and NumberOfTimeSlots (0054,0071) x
      NumberOfRRIntervals (0054,0061) for GATED; STATIC and WHOLE BODY are one volume.

    A series of several acquisitions with ImagesInAcquisition per acquisition completes after the first
    one; its other images then make a revision (as any late image does).
    """
    images = _count(header.get("ImagesInAcquisition"))
    if images is not None:
        positions = _count(header.get("NumberOfTemporalPositions")) or 1
        return images * positions
    if (modality or str(header.get("Modality", ""))).upper() != "PT":
        return None
    slices = _count(header.get("NumberOfSlices"))
    series_type = header.get("SeriesType")
    kind = str(series_type[0] if isinstance(series_type, list) and series_type else series_type or "")
    if slices is None:
        return None
    factors: tuple[str, ...]
    match kind.strip().upper():
        case "STATIC" | "WHOLE BODY":
            factors = ()
        case "DYNAMIC":
            factors = ("NumberOfTimeSlices",)
        case "GATED":
            factors = ("NumberOfTimeSlots", "NumberOfRRIntervals")
        case _:
            return None
    total = slices
    for keyword in factors:
        factor = _count(header.get(keyword))
        if factor is None:
            return None
        total *= factor
    return total


@dataclass(frozen=True)
class Completion:
    """Whether a series is complete now, by which rule, and why in words (its route note; no PHI)."""

    complete: bool
    by: Literal["signal", "expected", "quiet"]
    reason: str


@dataclass
class SweepStats:
    routed: int = 0
    unmatched: int = 0
    waiting: int = 0
    jobs: int = 0
    # How the routed and unmatched series were complete: sender's signal, expected count, quiet period.
    signalled: int = 0
    expected: int = 0
    quiet: int = 0


class CompletionSweep:
    def __init__(
        self,
        repo: SeriesRepository,
        queue: JobQueue,
        rules: Callable[[], RuleSet],
        default_quiet_s: float,
        max_attempts: int | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.repo = repo
        self.queue = queue
        self.rules = rules
        self.default_quiet_s = default_quiet_s
        self.max_attempts = max_attempts
        self.clock = clock

    def completion(self, row: SeriesRow, hits: list[Rule], now: datetime) -> Completion:
        """Is `row` complete at `now`? The sender's signal, then the expected count, then the quiet period."""
        if row.complete_signalled:
            return Completion(True, "signal", "association released")
        expected = expected_instance_count(row.header, row.modality)
        if expected is not None and row.instance_count >= expected:
            return Completion(True, "expected", f"{row.instance_count} of {expected} expected instances")
        periods = [r.action.quiet_period_s for r in hits if r.action.quiet_period_s is not None]
        quiet = max(periods) if periods else self.default_quiet_s
        quiet_now = row.last_received_at <= now - timedelta(seconds=quiet)
        return Completion(quiet_now, "quiet", f"quiet {quiet:g} s")

    def _candidates(self, now: datetime) -> list[SeriesRow]:
        """Signalled series first (so a long list of series still arriving never hides them), then every
        series still receiving, oldest first: an expected count may complete any of them."""
        rows = {row.series_instance_uid: row for row in self.repo.signalled_series()}
        for row in self.repo.due_series(now):
            rows.setdefault(row.series_instance_uid, row)
        return list(rows.values())

    def run_once(self) -> SweepStats:
        now = self.clock()
        stats = SweepStats()
        self.repo.requeue_stalled_routing(now - timedelta(seconds=STALLED_ROUTING_S))
        ruleset = self.rules()
        for row in self._candidates(now):
            hits = [rule for rule, _ in matching_rules(ruleset, series_attributes(row))]
            completion = self.completion(row, hits, now)
            if not completion.complete:
                stats.waiting += 1
                continue
            if not self.repo.claim_series_for_routing(
                row.series_instance_uid, row.generation, row.last_received_at
            ):
                continue  # another sweep took it, or a new instance arrived meanwhile
            if not hits:
                # Not an error: recorded so an admin can see why nothing happened.
                self.repo.mark_series(
                    row.series_instance_uid,
                    SeriesStatus.UNMATCHED,
                    f"no rule matched; complete: {completion.reason}",
                    generation=row.generation,
                )
                log.info(
                    "series %s complete (%d instances, %s): no rule matched",
                    row.series_instance_uid,
                    row.instance_count,
                    completion.reason,
                )
                _count_completion(stats, completion)
                stats.unmatched += 1
                continue
            for rule in hits:
                self.queue.enqueue(
                    JobKind.INFER,
                    InferPayload(
                        series_instance_uid=row.series_instance_uid,
                        study_instance_uid=row.study_instance_uid,
                        generation=row.generation,
                        rule_id=rule.id,
                        rule_version=rule.version,
                        model=rule.action.model,
                        destinations=list(rule.action.destinations),
                    ),
                    dedupe_key=infer_dedupe_key(row.series_instance_uid, row.generation, rule),
                    priority=rule.action.priority,
                    lock_key=f"series:{row.series_instance_uid}",
                    max_attempts=self.max_attempts,
                )
                stats.jobs += 1
            note = "routed by " + ", ".join(f"{r.id} v{r.version}" for r in hits)
            note += f"; complete: {completion.reason}"
            # generation guard: an instance that arrived after the claim re-opened the series; keep it open.
            self.repo.mark_series(
                row.series_instance_uid, SeriesStatus.ROUTED, note, generation=row.generation
            )
            log.info(
                "series %s complete (%d instances): %s", row.series_instance_uid, row.instance_count, note
            )
            _count_completion(stats, completion)
            stats.routed += 1
        return stats


def _count_completion(stats: SweepStats, completion: Completion) -> None:
    if completion.by == "signal":
        stats.signalled += 1
    elif completion.by == "expected":
        stats.expected += 1
    else:
        stats.quiet += 1


class SweepTrigger:
    """Runs the sweep as soon as it is kicked (a sender signalled a series complete), on a thread of its
    own, instead of at the scheduler's next interval. Kicks during a run coalesce into one more run.

    The release handler only kicks: routing never runs on an association's thread (DESIGN.md). The
    scheduled sweep keeps running too; both are idempotent, so overlapping runs route a series once.
    """

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def kick(self) -> None:
        self._wake.set()

    def start(self, run: Callable[[], object]) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(run,), name="completion-now", daemon=True)
        self._thread.start()

    def _loop(self, run: Callable[[], object]) -> None:
        while True:
            self._wake.wait()
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                run()
            except Exception:  # noqa: BLE001 - must outlive a failed run; the scheduled sweep retries too
                log.exception("completion sweep (on a completion signal) failed")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
