"""Series completion and routing: the sweep that turns quiet series into `infer` jobs.

A series is complete when no instance arrived for its quiet period (the longest quiet period of the
rules it matches, else the node default). When the header carries an expected count
(ImagesInAcquisition) and that many instances are in, the wait shortens to `EXPECTED_COUNT_QUIET_S`.
Every step is an idempotent, DB-guarded statement (compare-and-set on generation + last_received_at,
dedupe keys on jobs), so several node processes may run the sweep at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from dicom_ai_node.domain.jobs import JobKind
from dicom_ai_node.domain.payloads import InferPayload
from dicom_ai_node.domain.rules import Rule, RuleSet, matching_rules
from dicom_ai_node.persistence.queue import JobQueue
from dicom_ai_node.persistence.repository import SeriesRepository, SeriesRow, SeriesStatus
from dicom_ai_node.persistence.series_attrs import series_attributes

log = logging.getLogger(__name__)

EXPECTED_COUNT_QUIET_S = 1.0
# A sweep that claimed a series and died before enqueueing leaves it in 'routing'; retry after this.
STALLED_ROUTING_S = 60.0


def infer_dedupe_key(series_instance_uid: str, generation: int, rule: Rule) -> str:
    return f"infer:{series_instance_uid}:g{generation}:{rule.id}:v{rule.version}"


@dataclass
class SweepStats:
    routed: int = 0
    unmatched: int = 0
    waiting: int = 0
    jobs: int = 0


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

    def _quiet_for(self, row: SeriesRow, hits: list[Rule]) -> float:
        periods = [r.action.quiet_period_s for r in hits if r.action.quiet_period_s is not None]
        quiet = max(periods) if periods else self.default_quiet_s
        expected = row.header.get("ImagesInAcquisition")
        try:
            if expected and row.instance_count >= int(expected):
                quiet = min(quiet, EXPECTED_COUNT_QUIET_S)
        except (TypeError, ValueError):
            pass
        return quiet

    def run_once(self) -> SweepStats:
        now = self.clock()
        stats = SweepStats()
        self.repo.requeue_stalled_routing(now - timedelta(seconds=STALLED_ROUTING_S))
        ruleset = self.rules()
        rule_quiet = [r.action.quiet_period_s for r in ruleset.rules if r.action.quiet_period_s is not None]
        shortest = min([self.default_quiet_s, EXPECTED_COUNT_QUIET_S, *rule_quiet])
        for row in self.repo.due_series(now - timedelta(seconds=shortest)):
            hits = [rule for rule, _ in matching_rules(ruleset, series_attributes(row))]
            if row.last_received_at > now - timedelta(seconds=self._quiet_for(row, hits)):
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
                    "no rule matched",
                    generation=row.generation,
                )
                log.info(
                    "series %s complete (%d instances): no rule matched",
                    row.series_instance_uid,
                    row.instance_count,
                )
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
            # generation guard: an instance that arrived after the claim re-opened the series; keep it open.
            self.repo.mark_series(
                row.series_instance_uid, SeriesStatus.ROUTED, note, generation=row.generation
            )
            log.info(
                "series %s complete (%d instances): %s", row.series_instance_uid, row.instance_count, note
            )
            stats.routed += 1
        return stats
