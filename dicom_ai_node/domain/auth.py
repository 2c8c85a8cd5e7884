"""Who may do what in the admin page and API (DESIGN.md, "Control plane")."""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    """Roles in rising order of power; each one may do everything the ones below it may."""

    VIEWER = "viewer"  # read everything (no PHI is ever shown)
    OPERATOR = "operator"  # + retry, rerun, cancel, replay jobs; test destinations
    ADMIN = "admin"  # + routing rules, users, API tokens

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        """True when this role may do what `needed` may."""
        return self.rank >= needed.rank


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}
