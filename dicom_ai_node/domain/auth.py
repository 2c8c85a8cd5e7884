"""Who may do what in the admin page and API (DESIGN.md, "Control plane")."""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    """Roles in rising order of power; each one may do everything the ones below it may.

    SENDER is the exception to the ladder: it may read nothing, and its one right (STOW-RS, storing
    instances) is one that viewers lack; see `may_store`.
    """

    SENDER = "sender"  # STOW-RS senders (modalities, PACS, scripts): store instances, read nothing
    VIEWER = "viewer"  # read everything (no PHI is ever shown)
    OPERATOR = "operator"  # + retry, rerun, cancel, replay jobs; test destinations
    ADMIN = "admin"  # + routing rules, users, API tokens

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        """True when this role may do what `needed` may."""
        return self.rank >= needed.rank

    @property
    def may_store(self) -> bool:
        """May send instances to the node over STOW-RS: senders, operators and admins, not viewers (a
        viewer's token only reads; storing data is a write)."""
        return self is Role.SENDER or self.allows(Role.OPERATOR)


_RANK = {Role.SENDER: -1, Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}
