"""The append-only audit log of admin actions and security events (DESIGN.md, "Control plane").

Rows are only ever inserted; the migration adds triggers that refuse UPDATE and DELETE on both engines.

No PHI, ever: callers must not put patient names, IDs, birth dates or any other header value that
identifies a patient into `actor`, `target` or `detail`. Targets are rule ids, job ids, user names,
token ids and UIDs; details are comments, rule diffs, reasons and counts.

Action names: auth.login, auth.login_failed, auth.login_locked, auth.logout, auth.denied, auth.csrf_failed,
user.create, user.update, token.create, token.revoke, rule.seed, rule.create, rule.update, rule.delete,
rule.rollback, rule.import, job.retry, job.rerun, job.cancel, deadletter.replay, destination.test,
audit.export, stow.store. Actor: a user name (page/API) or "cli:<os user>"; source: the client IP or "cli".

DICOM traffic, in the spirit of PS3.15 A.5 (IHE ATNA), written by the edges and the worker, never by the
API: dicom.instances_transferred (A.5.3.10 "DICOM Instances Transferred"; detail.role "destination" for
one received association or pull job, "source" for one deliver job; actor: the calling AE title or, for
sending, this node's; target: the study UIDs) and security.alert (A.5.3.11 "Security Alert": refused
associations, coalesced to one row per peer address per minute with the count; source: the peer IP).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from dicom_ai_node.errors import DatabaseError
from dicom_ai_node.persistence._common import Clock, dump_json, load_json, utcnow
from dicom_ai_node.persistence.tables import audit_events

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "denied", "failed")
_ACTOR_MAX = 64
_SOURCE_MAX = 64
_ACTION_MAX = 64
_TARGET_MAX = 255


@dataclass(frozen=True)
class AuditEvent:
    id: int
    at: datetime
    actor: str
    source: str
    action: str
    target: str
    outcome: str
    detail: dict[str, Any]


class AuditLog:
    def __init__(self, engine: sa.Engine, clock: Clock = utcnow) -> None:
        self._engine = engine
        self._clock = clock

    def record(
        self,
        *,
        actor: str,
        source: str,
        action: str,
        target: str = "",
        outcome: str = "ok",
        detail: Mapping[str, Any] | None = None,
    ) -> int:
        """Append one event and return its id. `detail` is stored as a JSON object (no PHI in it)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"audit outcome must be one of {OUTCOMES}, not {outcome!r}")
        if not action or len(action) > _ACTION_MAX:
            raise ValueError(f"audit action must be 1-{_ACTION_MAX} characters")
        stmt = (
            sa.insert(audit_events)
            .values(
                at=self._clock(),
                # Truncated rather than refused: an over-long user name typed at the sign-in form must
                # still leave its auth.login_failed trace.
                actor=actor[:_ACTOR_MAX],
                source=source[:_SOURCE_MAX],
                action=action,
                target=target[:_TARGET_MAX],
                outcome=outcome,
                detail=dump_json(detail),
            )
            .returning(audit_events.c.id)
        )
        with self._engine.begin() as conn:
            return int(conn.execute(stmt).scalar_one())

    def record_quietly(
        self,
        *,
        actor: str,
        source: str,
        action: str,
        target: str = "",
        outcome: str = "ok",
        detail: Mapping[str, Any] | None = None,
    ) -> int | None:
        """As `record`, for the DICOM edge and the worker: an audit write must never fail the C-STORE or
        the job it records, so a database that cannot be used is one warning and None."""
        try:
            return self.record(
                actor=actor, source=source, action=action, target=target, outcome=outcome, detail=detail
            )
        except DatabaseError as exc:
            log.warning("audit event %s (%s) not recorded: %s", action, target or "-", exc)
            return None

    def list_events(
        self,
        *,
        limit: int = 100,
        before_id: int | None = None,
        action: str | None = None,
        actor: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[AuditEvent]:
        """Events newest first. `before_id` pages backwards (pass the last id of the previous page).

        `action` matches whole dotted segments: "rule" and "rule." match rule.update and rule.delete,
        "auth.login" matches auth.login only (not auth.login_failed). `since` is inclusive, `until`
        exclusive.
        """
        query = sa.select(audit_events)
        if before_id is not None:
            query = query.where(audit_events.c.id < before_id)
        if action:
            query = query.where(_action_matches(action))
        if actor is not None:
            query = query.where(audit_events.c.actor == actor)
        if since is not None:
            query = query.where(audit_events.c.at >= since)
        if until is not None:
            query = query.where(audit_events.c.at < until)
        query = query.order_by(audit_events.c.id.desc()).limit(max(0, limit))
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_event(r) for r in rows]

    def count(
        self, *, action: str, since: datetime, actor: str | None = None, source: str | None = None
    ) -> int:
        """How many `action` events (exact name) happened at or after `since`: sign-in rate limiting."""
        query = (
            sa.select(sa.func.count())
            .select_from(audit_events)
            .where(audit_events.c.action == action, audit_events.c.at >= since)
        )
        if actor is not None:
            query = query.where(audit_events.c.actor == actor[:_ACTOR_MAX])
        if source is not None:
            query = query.where(audit_events.c.source == source[:_SOURCE_MAX])
        with self._engine.connect() as conn:
            return int(conn.execute(query).scalar_one())


def _action_matches(action: str) -> sa.ColumnElement[bool]:
    column = audit_events.c.action
    if action.endswith("."):
        return column.startswith(action, autoescape=True)
    return sa.or_(column == action, column.startswith(action + ".", autoescape=True))


def _event(row: Any) -> AuditEvent:
    return AuditEvent(
        id=row["id"],
        at=row["at"],
        actor=row["actor"],
        source=row["source"],
        action=row["action"],
        target=row["target"],
        outcome=row["outcome"],
        detail=load_json(row["detail"]),
    )
