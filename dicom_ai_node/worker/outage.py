"""A database outage logged as one line, not as a traceback per poll (docs/reliability.md, "Faults").

While the database is down or restarting, every worker poll and every sweep fails with DatabaseError.
Logged with its traceback each time, a PostgreSQL restart held down for 3 s wrote about 7,000 log lines
(three workers polling every 0.2 s, two sweeps); a ten-minute outage would write a million. Instead: one
WARNING when the outage starts, a reminder every `remind_s`, one INFO line when the database is back,
and polls spaced out (doubling up to `cap_s`) while it is down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from dicom_ai_node.errors import DatabaseError


class DatabaseOutage:
    """What one loop (a worker, a sweep) saw of the database: `failed` on each DatabaseError, `cleared`
    after each success. Thread-safe (a sweep may overlap itself)."""

    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        *,
        base_s: float = 0.5,
        cap_s: float = 2.0,
        remind_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self._log = logger
        self._base_s, self._cap_s, self._remind_s = base_s, cap_s, remind_s
        self._clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None
        self._reminded_at = 0.0
        self._failures = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, exc: DatabaseError) -> float:
        """Note a failure; returns how long to wait before the next try."""
        with self._lock:
            now = self._clock()
            self._failures += 1
            if self._since is None:
                self._since = self._reminded_at = now
                self._log.warning("%s: %s; retrying until it is back", self.what, exc)
            elif now - self._reminded_at >= self._remind_s:
                self._reminded_at = now
                self._log.warning(
                    "%s: database still unavailable after %.0f s (%d tries): %s",
                    self.what,
                    now - self._since,
                    self._failures,
                    exc,
                )
            return float(min(self._cap_s, self._base_s * 2 ** min(self._failures - 1, 16)))

    def cleared(self, tried_at: float | None = None) -> None:
        """Note a success: ends an outage (one INFO line) if there was one. `tried_at` (the clock's time
        when the successful try began; default now): a worker's try includes the job it ran."""
        with self._lock:
            if self._since is None:
                return
            back = self._clock() if tried_at is None else tried_at
            self._log.info(
                "%s: database back after %.1f s (%d failed tries)",
                self.what,
                max(0.0, back - self._since),
                self._failures,
            )
            self._since = None
            self._failures = 0
