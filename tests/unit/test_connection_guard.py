"""The connection guard's bookkeeping, on a fake clock: limits, deadlines, and the rate-limited log."""

from __future__ import annotations

import logging

import pytest

from dicom_ai_node.receive.guard import ConnectionGuard, ConnectionLimits

LIMITS = ConnectionLimits(
    max_associations=4,
    max_associations_per_ip=2,
    max_associations_per_ae=1,
    setup_timeout_s=10,
    pdu_timeout_s=5,
    log_interval_s=60,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limits_per_ip_and_in_total_and_release_frees_the_slot() -> None:
    guard = ConnectionGuard(LIMITS, clock=Clock())
    assert guard.admit("a1", "10.0.0.1") and guard.admit("a2", "10.0.0.1")
    assert not guard.admit("a3", "10.0.0.1")  # per IP
    assert guard.admit("b1", "10.0.0.2") and guard.admit("c1", "10.0.0.3")
    assert not guard.admit("d1", "10.0.0.4")  # in total
    guard.release("a1")
    assert guard.admit("d1", "10.0.0.4")
    assert guard.open_count() == 4 and guard.open_count("10.0.0.1") == 1


def test_per_calling_ae_limit_counts_other_connections_only() -> None:
    guard = ConnectionGuard(LIMITS, clock=Clock())
    guard.admit("a", "10.0.0.1")
    guard.admit("b", "10.0.0.2")
    assert guard.claim_calling_ae("a", "PACS")
    assert guard.claim_calling_ae("a", "PACS")  # the same connection asking again is not a second one
    assert not guard.claim_calling_ae("b", "PACS")
    assert guard.claim_calling_ae("b", "MODALITY")
    guard.release("a")
    guard.admit("c", "10.0.0.3")
    assert guard.claim_calling_ae("c", "PACS")


def test_setup_and_pdu_deadlines_expire_each_connection_once() -> None:
    clock = Clock()
    guard = ConnectionGuard(LIMITS, clock=clock)
    guard.admit("silent", "10.0.0.1")
    guard.admit("stalled", "10.0.0.2")
    guard.settled("stalled")
    clock.now += 1
    guard.pdu_started("stalled")
    clock.now += 4.9
    assert guard.expire() == []
    clock.now += 0.2  # stalled: 5.1 s into its PDU
    assert [(e.key, "PDU incomplete" in e.reason) for e in guard.expire()] == [("stalled", True)]
    clock.now += 5  # silent: 11.1 s after the accept
    assert [e.key for e in guard.expire()] == ["silent"]
    assert guard.expire() == []


def test_refusals_are_logged_once_per_address_and_kind_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    guard = ConnectionGuard(LIMITS, clock=clock)
    caplog.set_level(logging.WARNING, logger="dicom_ai_node.receive.guard")
    guard.admit("a", "10.0.0.1")
    guard.admit("b", "10.0.0.1")
    for i in range(50):
        assert not guard.admit(f"x{i}", "10.0.0.1")
    assert len(caplog.records) == 1
    clock.now += 61
    assert not guard.admit("y", "10.0.0.1")
    assert len(caplog.records) == 2
    assert "49 more like this" in caplog.records[1].getMessage()
