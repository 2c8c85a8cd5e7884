"""Audit events of DICOM traffic (PS3.15 A.5 in spirit) against real peers over loopback: pynetdicom as
the sender, DCMTK storescp as the destination. One event per association or deliver job, refusals
coalesced per peer address, and never a patient name in any audit row."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_ai_node.config import Destination, NodeSettings
from dicom_ai_node.devtools.dcmtk import storescp
from dicom_ai_node.devtools.synthetic import FAKE_PATIENT_ID, write_ct_series
from dicom_ai_node.domain.jobs import JobKind, JobStatus
from dicom_ai_node.domain.payloads import PullPayload
from dicom_ai_node.errors import DatabaseError
from dicom_ai_node.node import Services, build_services, build_workers
from dicom_ai_node.persistence.audit import AuditEvent, AuditLog
from dicom_ai_node.pull.service import Puller, PullProgress
from dicom_ai_node.receive.audit import ACTION_SECURITY_ALERT, ACTION_TRANSFERRED, SecurityAlerts
from dicom_ai_node.receive.scp import StorageSCP
from dicom_ai_node.worker.pull_stage import run_pull
from tests.conftest import free_port

CANARY_NAME = "Canary^Audit^Marker"


@dataclass(frozen=True)
class AuditedScp:
    scp: StorageSCP
    services: Services
    audit: AuditLog


@pytest.fixture
def audited_scp(node_settings: NodeSettings) -> Iterator[AuditedScp]:
    # Twenty refusals in a row from 127.0.0.1 must reach the AE checks, not the per-address connection
    # limit (a refused association's connection is still counted while it closes).
    dicom = node_settings.dicom.model_copy(update={"max_associations_per_ip": 64})
    settings = node_settings.model_copy(update={"dicom": dicom})
    services = build_services(settings, migrate="upgrade")
    audit = AuditLog(services.engine)
    scp = StorageSCP(settings, services.spool, services.repo, audit=audit)
    scp.start()
    try:
        yield AuditedScp(scp, services, audit)
    finally:
        scp.stop()


def _associate(port: int, calling: str = "TESTSCU", called: str = "AINODE") -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title=called)


def _events(audit: AuditLog, action: str, n: int, timeout_s: float = 5.0) -> list[AuditEvent]:
    """The `action` events once at least `n` are there (association threads write them), then a short
    settle so that a second, unwanted row would show too."""
    deadline = time.monotonic() + timeout_s
    while len(audit.list_events(action=action)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    return audit.list_events(action=action)


def _assert_no_phi(audit: AuditLog) -> None:
    for event in audit.list_events(limit=1000):
        text = json.dumps([event.actor, event.source, event.target, event.detail])
        for mark in (CANARY_NAME, "Canary", FAKE_PATIENT_ID, "Synthetic^Phantom"):
            assert mark not in text, (event.action, text)


def test_one_association_storing_three_instances_is_one_event_without_patient_names(
    audited_scp: AuditedScp, tmp_path: Path
) -> None:
    files = write_ct_series(tmp_path / "ct", n_slices=3)
    datasets = [dcmread(f) for f in files]
    for ds in datasets:
        ds.PatientName = CANARY_NAME
    assoc = _associate(audited_scp.scp.port)
    assert assoc.is_established
    statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    assoc.release()
    assert statuses == [0, 0, 0]

    [event] = _events(audited_scp.audit, ACTION_TRANSFERRED, 1)
    study_uid = str(datasets[0].StudyInstanceUID)
    assert (event.actor, event.source, event.target, event.outcome) == (
        "TESTSCU",
        "127.0.0.1",
        study_uid,
        "ok",
    )
    detail = event.detail
    assert detail["role"] == "destination" and detail["via"] == "C-STORE"
    assert (detail["calling_ae"], detail["called_ae"]) == ("TESTSCU", "AINODE")
    assert (detail["instances"], detail["stored"], detail["duplicates"], detail["failed"]) == (3, 3, 0, 0)
    assert detail["statuses"] == {"0x0000": 3}
    assert detail["studies"] == [study_uid] and detail["association"] == "released"
    assert detail["bytes"] > 0
    _assert_no_phi(audited_scp.audit)


def test_refused_instances_and_an_abort_make_a_failed_event(audited_scp: AuditedScp, tmp_path: Path) -> None:
    [good, bad] = [dcmread(f) for f in write_ct_series(tmp_path / "ct", n_slices=2)]
    del bad.SeriesInstanceUID
    assoc = _associate(audited_scp.scp.port)
    assert assoc.send_c_store(good).Status == 0x0000
    assert assoc.send_c_store(good).Status == 0x0000  # a duplicate, kept once
    assert assoc.send_c_store(bad).Status == 0xA900
    assoc.abort()

    [event] = _events(audited_scp.audit, ACTION_TRANSFERRED, 1)
    assert event.outcome == "failed"
    detail = event.detail
    assert (detail["instances"], detail["stored"], detail["duplicates"], detail["failed"]) == (3, 1, 1, 1)
    assert detail["statuses"] == {"0x0000": 2, "0xA900": 1}
    assert detail["association"] == "aborted"


def test_an_echo_only_association_writes_no_transfer_event(audited_scp: AuditedScp) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", audited_scp.scp.port, ae_title="AINODE")
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert _events(audited_scp.audit, ACTION_TRANSFERRED, 1, timeout_s=0.5) == []


def test_a_rejected_calling_ae_is_one_security_alert(audited_scp: AuditedScp) -> None:
    assert _associate(audited_scp.scp.port, calling="INTRUDER").is_rejected
    audited_scp.scp.stop()  # writes the still-open window
    [alert] = audited_scp.audit.list_events(action=ACTION_SECURITY_ALERT)
    assert (alert.actor, alert.source, alert.outcome) == ("INTRUDER", "127.0.0.1", "denied")
    assert alert.detail["count"] == 1
    assert alert.detail["reasons"] == {"calling AE not allowed": 1}
    assert audited_scp.audit.list_events(action=ACTION_TRANSFERRED) == []


def test_twenty_refusals_from_one_address_in_a_minute_are_one_row(audited_scp: AuditedScp) -> None:
    for i in range(10):
        assert _associate(audited_scp.scp.port, calling="INTRUDER").is_rejected
        # An allowed AE calling another AE title than ours is refused as well (called AE check).
        assert _associate(audited_scp.scp.port, calling="TESTSCU", called=f"OTHER{i}").is_rejected
    audited_scp.scp.stop()
    [alert] = audited_scp.audit.list_events(action=ACTION_SECURITY_ALERT)
    assert alert.source == "127.0.0.1" and alert.detail["count"] == 20
    assert alert.detail["reasons"] == {"calling AE not allowed": 10, "called AE title is not this node's": 10}
    assert alert.detail["calling_aes"] == ["INTRUDER", "TESTSCU"]
    assert len(alert.detail["called_aes"]) == 10  # at most 10 kept, however many were tried


def test_connections_refused_at_accept_or_closed_at_the_deadline_are_alerts(
    node_settings: NodeSettings,
) -> None:
    """Refusals before any A-ASSOCIATE-RQ (per-address limit, setup deadline) reach the audit too,
    coalesced with no AE titles (none was sent)."""
    dicom = node_settings.dicom.model_copy(
        update={"max_associations_per_ip": 2, "association_setup_timeout_s": 0.5}
    )
    settings = node_settings.model_copy(update={"dicom": dicom})
    services = build_services(settings, migrate="upgrade")
    audit = AuditLog(services.engine)
    scp = StorageSCP(settings, services.spool, services.repo, audit=audit)
    scp.start()
    silent = [socket.create_connection(("127.0.0.1", scp.port)) for _ in range(4)]
    try:
        for conn in silent:  # two are closed at accept, two at the setup deadline: each read ends
            conn.settimeout(10)
            try:
                assert conn.recv(1) == b""
            except ConnectionResetError:
                pass
    finally:
        for conn in silent:
            conn.close()
        scp.stop()
    [alert] = audit.list_events(action=ACTION_SECURITY_ALERT)
    assert (alert.actor, alert.source, alert.outcome) == ("(no AE title)", "127.0.0.1", "denied")
    assert alert.detail["calling_aes"] == [] and alert.detail["called_aes"] == []
    assert alert.detail["reasons"] == {
        "connection limit per address": 2,
        "no association within 0.5 s of connecting": 2,
    }


def test_an_allowed_ae_over_its_association_limit_is_an_alert(node_settings: NodeSettings) -> None:
    dicom = node_settings.dicom.model_copy(update={"max_associations_per_ae": 1})
    settings = node_settings.model_copy(update={"dicom": dicom})
    services = build_services(settings, migrate="upgrade")
    audit = AuditLog(services.engine)
    scp = StorageSCP(settings, services.spool, services.repo, audit=audit)
    scp.start()
    try:
        first = _associate(scp.port)
        assert first.is_established
        assert _associate(scp.port).is_rejected  # the same AE's second association
        first.release()
    finally:
        scp.stop()
    [alert] = audit.list_events(action=ACTION_SECURITY_ALERT)
    assert (alert.actor, alert.source) == ("TESTSCU", "127.0.0.1")
    assert alert.detail["reasons"] == {"association limit per calling AE": 1}


def test_alert_windows_close_after_a_minute_and_addresses_are_bounded(node_settings: NodeSettings) -> None:
    services = build_services(node_settings, migrate="upgrade")
    audit = AuditLog(services.engine)
    now = [0.0]
    alerts = SecurityAlerts(audit, window_s=60, max_peers=2, monotonic=lambda: now[0])
    alerts.note("10.0.0.1", "X", "AINODE", "calling AE not allowed")
    now[0] = 59.0
    alerts.note("10.0.0.1", "X", "AINODE", "calling AE not allowed")
    assert alerts.flush() == 0  # the window is still open
    now[0] = 60.0
    assert alerts.flush() == 1
    for i in range(5):  # an address scan: the third address on is counted under "*"
        alerts.note(f"10.0.1.{i}", "X", "AINODE", "calling AE not allowed")
    assert alerts.flush(all_open=True) == 3
    counts = {e.source: e.detail["count"] for e in audit.list_events(action=ACTION_SECURITY_ALERT)}
    assert counts == {"10.0.0.1": 2, "10.0.1.0": 1, "10.0.1.1": 1, "*": 3}


def _deliver_node(node_settings: NodeSettings, pacs_port: int) -> Services:
    settings = node_settings.model_copy(
        update={
            "destinations": [
                Destination(
                    name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs_port, timeout_s=5, verify=False
                )
            ]
        }
    )
    return build_services(settings, migrate="upgrade")


def test_a_deliver_job_to_storescp_is_one_sent_event(node_settings: NodeSettings, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "ct", n_slices=3)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    with storescp(tmp_path / "pacs") as port:
        services = _deliver_node(node_settings, port)
        rels = [services.spool.commit_file(f, "results") for f in files]
        services.queue.enqueue(JobKind.DELIVER, {"destination": "pacs", "files": rels}, max_attempts=3)
        [worker] = build_workers(services, [JobKind.DELIVER])
        worker.run_one()
    [job] = services.queue.list_jobs(kind=JobKind.DELIVER)
    assert job.status == JobStatus.SUCCEEDED, job.last_error
    audit = AuditLog(services.engine)
    [event] = audit.list_events(action=ACTION_TRANSFERRED)
    assert (event.actor, event.source, event.target, event.outcome) == ("AINODE", "worker", study_uid, "ok")
    detail = event.detail
    assert detail["role"] == "source" and detail["via"] == "C-STORE"
    assert (detail["destination"], detail["address"]) == ("pacs", f"PACS@127.0.0.1:{port}")
    assert (detail["studies"], detail["series"], detail["instances"]) == ([study_uid], [series_uid], 3)
    assert detail["verified"] is False and detail["job_id"] == job.id
    _assert_no_phi(audit)


def test_a_dead_deliver_job_is_one_failed_event(node_settings: NodeSettings, tmp_path: Path) -> None:
    services = _deliver_node(node_settings, free_port())  # nothing listens there
    rels = [services.spool.commit_file(f, "results") for f in write_ct_series(tmp_path / "ct", n_slices=2)]
    services.queue.enqueue(JobKind.DELIVER, {"destination": "pacs", "files": rels}, max_attempts=1)
    [worker] = build_workers(services, [JobKind.DELIVER])
    worker.run_one()
    [job] = services.queue.list_jobs(kind=JobKind.DELIVER)
    assert job.status == JobStatus.DEAD
    audit = AuditLog(services.engine)
    [event] = audit.list_events(action=ACTION_TRANSFERRED)
    assert event.outcome == "failed" and event.source == "worker"
    assert event.detail["destination"] == "pacs" and event.detail["instances"] == 2
    assert "cannot associate" in event.detail["error"]
    _assert_no_phi(audit)


def test_an_audit_table_that_cannot_be_written_fails_no_c_store(
    audited_scp: AuditedScp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unavailable(self: AuditLog, **kwargs: Any) -> int:
        raise DatabaseError("database unavailable: disk I/O error")

    monkeypatch.setattr(AuditLog, "record", unavailable)
    [ds] = [dcmread(f) for f in write_ct_series(tmp_path / "ct", n_slices=1)]
    assoc = _associate(audited_scp.scp.port)
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    deadline = time.monotonic() + 5
    while "not recorded" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"audit event {ACTION_TRANSFERRED} ({ds.StudyInstanceUID}) not recorded" in caplog.text
    row = audited_scp.services.repo.get_series(str(ds.SeriesInstanceUID))
    assert row is not None and row.instance_count == 1


def test_a_finished_pull_job_is_one_received_event(
    node_settings: NodeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = build_services(node_settings, migrate="upgrade")
    audit = AuditLog(services.engine)
    puller = Puller(node_settings, services.spool, services.repo)

    def pull(source: str, study: str, series: str | None = None, progress: Any = None) -> PullProgress:
        return PullProgress(
            source, "C-GET", study, series_total=2, series_done=2, retrieved=5, stored=4, duplicates=1
        )

    monkeypatch.setattr(puller, "pull", pull)
    services.queue.enqueue(JobKind.PULL, {"source": "pacs", "study_instance_uid": "1.2.3.4"})
    job = services.queue.claim("test-worker", [JobKind.PULL], 60)
    assert job is not None
    run_pull(job, PullPayload.model_validate(job.payload), puller, services.queue, audit)
    [event] = audit.list_events(action=ACTION_TRANSFERRED)
    assert (event.target, event.outcome, event.source) == ("1.2.3.4", "ok", "worker")
    detail = event.detail
    assert (detail["role"], detail["via"], detail["source"], detail["job_id"]) == (
        "destination",
        "C-GET",
        "pacs",
        job.id,
    )
    assert (detail["instances"], detail["stored"], detail["duplicates"]) == (5, 4, 1)
