"""Job kinds and states of the durable queue (DESIGN.md, "Queue and persistence")."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass


class JobKind(enum.StrEnum):
    INFER = "infer"
    DELIVER = "deliver"
    PULL = "pull"  # query/retrieve a study from a PACS source into the spool (then routed as received)


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # failed one attempt, waiting for its retry (scheduled_at in the future)
    DEAD = "dead"  # exhausted or permanent failure: dead letter, re-playable by an admin
    CANCELLED = "cancelled"  # stopped by an operator before it ran (or while waiting for a retry)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter and a cap.

    Fixed short retries hammer a PACS that is down (MONAI informatics-gateway#153); fixed long ones
    (mercure 900 s x 5) leave results hours late. Delay for attempt n (1-based) is drawn uniformly from
    [base * 2**(n-1) / 2, base * 2**(n-1)], capped at `cap_s`.
    """

    base_s: float = 5.0
    cap_s: float = 600.0
    max_attempts: int = 8

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.cap_s, self.base_s * 2.0 ** max(0, attempt - 1))
        r = float((rng or random).random())
        return ceiling / 2 + r * ceiling / 2


@dataclass(frozen=True)
class QueueStats:
    """Waiting work of one job kind: jobs queued or waiting for a retry, and how old the oldest is."""

    depth: int
    oldest_age_s: float


@dataclass(frozen=True)
class PullRequest:
    """Pull a study (or one series of it) from a configured source; its job's payload is a
    domain.payloads.PullPayload (UIDs and the source name only: the admin page shows it)."""

    source: str
    study_instance_uid: str
    series_instance_uid: str | None = None

    # Pulls go before routine work of the same priority: an operator is usually waiting for them.
    PRIORITY = 20
    MAX_ATTEMPTS = 3

    def dedupe_key(self) -> str:
        """At most one unfinished pull per key (JobQueue.enqueue_while_unfinished)."""
        return f"pull:{self.source}:{self.study_instance_uid}:{self.series_instance_uid or '*'}"
