"""A database outage is logged once (plus a reminder a minute), not once per poll, and polls back off."""

from __future__ import annotations

import logging

import pytest

from dicom_ai_node.errors import DatabaseError
from dicom_ai_node.worker.outage import DatabaseOutage


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_outage_a_reminder_a_minute_and_one_line_when_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    outage = DatabaseOutage("worker w1", logging.getLogger("test.outage"), base_s=0.25, cap_s=2, clock=clock)
    error = DatabaseError("database unavailable: connection refused")
    with caplog.at_level(logging.INFO, logger="test.outage"):
        outage.cleared()  # no outage: nothing to say
        delays = []
        for _ in range(481):  # two minutes of polls every 0.25 s, both ends included
            delays.append(outage.failed(error))
            clock.now += 0.25
        assert outage.down
        outage.cleared(tried_at=100.0 + 121)
    assert [r.getMessage() for r in caplog.records] == [
        "worker w1: database unavailable: connection refused; retrying until it is back",
        "worker w1: database still unavailable after 60 s (241 tries): database unavailable: connection refused",
        "worker w1: database still unavailable after 120 s (481 tries): database unavailable: connection refused",
        "worker w1: database back after 121.0 s (481 failed tries)",
    ]
    assert delays[:5] == [0.25, 0.5, 1.0, 2.0, 2.0] and max(delays) == 2.0
    assert not outage.down
    assert outage.failed(error) == 0.25  # a new outage starts over
