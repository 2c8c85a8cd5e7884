"""The native receive edge (`dicom.receiver: dcmtk`, native/ainode-storescp) against real peers on loopback.

The binary is built by the README's install step (scripts/bootstrap.sh): missing in CI is a failure, not a
skip. What the Python SCP promises, the native edge keeps: files stored as received and indexed, unknown
or wrongly called AE titles refused at association, every instance of the bad-input corpus answered with
the status the Python path answers, nothing acknowledged lost when the native process or the whole node
is killed (landed files get their rows at recovery), and received series processed by the workers.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.devtools.dcmtk import storescp, storescu
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.ports import free_port, wait_port
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.errors import ConfigError
from dicom_ai_node.node import Services, build_services
from dicom_ai_node.persistence.audit import AuditLog
from dicom_ai_node.persistence.db import make_engine, upgrade_schema
from dicom_ai_node.persistence.repository import InstanceRecord, SeriesRepository
from dicom_ai_node.receive.audit import ACTION_TRANSFERRED
from dicom_ai_node.receive.landing import LANDING, LandingIndexer
from dicom_ai_node.receive.native import NativeReceiver, config_text, find_binary
from dicom_ai_node.store.spool import Spool
from tests.conftest import RunningScp
from tests.support.bad_input import CASES, LONG_UID, bad_instance, ct_dataset, storescu_once, write_part10
from tests.support.faults import (
    NodeSnapshot,
    SendLog,
    check_consistency,
    fault_rules_file,
    node_extra,
    plan_batches,
    run_kill_rounds,
    start_senders,
    stored_data_set,
    wait_for,
)
from tests.support.tools import require, require_executable


@pytest.fixture(scope="module")
def binary() -> Path:
    try:
        return find_binary()
    except ConfigError as exc:
        require(False, "the native receiver (build/ainode-storescp)", str(exc))
        raise


@pytest.fixture
def native(node_settings: NodeSettings, binary: Path) -> Iterator[tuple[NativeReceiver, Services]]:
    settings = node_settings.model_copy(
        update={"dicom": node_settings.dicom.model_copy(update={"port": free_port(), "receiver": "dcmtk"})}
    )
    services = build_services(settings, migrate="upgrade")
    receiver = NativeReceiver(
        settings, services.spool, services.repo, audit=AuditLog(services.engine), binary=binary
    )
    receiver.start()
    try:
        yield receiver, services
    finally:
        receiver.stop()
        services.engine.dispose()


def _associate(port: int, calling: str = "TESTSCU", called: str = "AINODE") -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title=called)


def _send_file(port: int, path: Path) -> int:
    """C-STORE `path` as it is on disk (the request's UIDs are its File Meta Information's)."""
    assoc = _associate(port)
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    return int(status.Status)


def _wait_indexed(services: Services, series_uid: str, count: int, timeout_s: float = 20) -> None:
    def done() -> bool:
        return len(services.repo.instances_of_series(series_uid)) >= count

    assert wait_for(done, timeout_s, interval_s=0.05), f"{count} instances of {series_uid} not indexed"


def _landing(services: Services) -> list[Path]:
    return sorted((services.spool.root / LANDING).iterdir())


def test_storescu_instances_are_stored_as_received_indexed_and_audited(
    native: tuple[NativeReceiver, Services], tmp_path: Path
) -> None:
    receiver, services = native
    paths = write_ct_series(tmp_path / "ct", n_slices=12, rows=64, cols=64)
    storescu([tmp_path / "ct"], "AINODE", receiver.port, "STORESCU", "+sd")
    first = dcmread(paths[0], stop_before_pixels=True)
    _wait_indexed(services, str(first.SeriesInstanceUID), 12)
    rows = {
        row.sop_instance_uid: row for row in services.repo.instances_of_series(str(first.SeriesInstanceUID))
    }
    for path in paths:
        sent_ts, sent = stored_data_set(path)
        row = rows[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)]
        stored = services.spool.path(row.spool_path)
        # Byte for byte what storescu put on the wire, in the spool's own layout, with the calling AE.
        assert stored_data_set(stored) == (sent_ts, sent)
        assert row.spool_path.startswith("instances/") and row.calling_ae == "STORESCU"
        assert row.transfer_syntax_uid == sent_ts
    series = services.repo.get_series(str(first.SeriesInstanceUID))
    assert series is not None and series.instance_count == 12 and series.modality == "CT"
    assert wait_for(lambda: not _landing(services), 10, interval_s=0.05)
    events = AuditLog(services.engine)

    def audited() -> bool:
        return any(e.detail.get("stored") == 12 for e in events.list_events(action=ACTION_TRANSFERRED))

    assert wait_for(audited, 10, interval_s=0.1)
    [event] = events.list_events(action=ACTION_TRANSFERRED)
    assert (event.actor, event.outcome, event.detail["association"]) == ("STORESCU", "ok", "released")
    assert event.target == str(first.StudyInstanceUID)


def _stitched(trace: Path) -> list[tuple[int, int, str]]:
    """strace -f output as (entered, returned, text) per call: `<unfinished ...>` and `<... resumed>`
    halves joined per thread; positions are line numbers (strace's total order)."""
    calls: list[tuple[int, int, str]] = []
    pending: dict[str, tuple[int, str]] = {}
    for number, line in enumerate(trace.read_text(errors="replace").splitlines()):
        pid, _, rest = line.partition(" ")
        rest = rest.strip()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = (number, rest)
        elif rest.startswith("<..."):
            entered, head = pending.pop(pid, (number, ""))
            calls.append((entered, number, head + rest))
        else:
            calls.append((number, number, rest))
    return calls


def test_write_order_before_each_success_fsync_rename_fsync_dir_then_response(
    node_settings: NodeSettings, binary: Path, tmp_path: Path
) -> None:
    """Read from the receiver's own system calls (kill -9 keeps the page cache; a power cut would not):
    for every instance, fsync(temp file) -> rename into landing/ -> an fsync of landing/ that began after
    the rename -> only then the C-STORE-RSP naming the instance goes out on the socket."""
    strace = require_executable("strace", "apt-get install strace (scripts/bootstrap.sh installs it)")
    spool = Spool(tmp_path / "spool")
    landing = spool.root / LANDING
    landing.mkdir()
    port = free_port()
    settings = node_settings.model_copy(
        update={"dicom": node_settings.dicom.model_copy(update={"port": port, "receiver": "dcmtk"})}
    )
    config = tmp_path / "receiver.conf"
    config.write_text(config_text(settings, landing, spool.incoming))
    trace = tmp_path / "trace.txt"
    traced = "fsync,fdatasync,/^rename,write,writev,sendto,sendmsg"
    proc = subprocess.Popen(
        [
            strace,
            "-f",
            "-yy",
            "-s",
            "4096",
            "-e",
            f"trace={traced}",
            "-o",
            str(trace),
            str(binary),
            str(config),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, timeout_s=30)
        write_ct_series(tmp_path / "ct", n_slices=3, rows=32, cols=32)
        storescu([tmp_path / "ct"], "AINODE", port, "STORESCU", "+sd")
    finally:
        # strace detaches on a signal of its own; the receiver stops on SIGQUIT and strace with it.
        _signal_children(proc.pid, signal.SIGQUIT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_children(proc.pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
            raise
    calls = _stitched(trace)
    landed = sorted(landing.iterdir())
    assert len(landed) == 3
    for path in landed:
        name, sop = path.stem, str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        file_sync = _first(calls, -1, "fsync(", f"-{name}.part>", "= 0")
        renamed = _first(calls, -1, "rename", f"/{LANDING}/{name}.dcm", "= 0")
        dir_sync = _first(calls, renamed[1], "fsync(", f"/{LANDING}>", "= 0")
        response = _first(calls, dir_sync[1], "write", "TCP:", sop)
        assert file_sync[1] < renamed[0] <= renamed[1] < dir_sync[0] <= dir_sync[1] < response[0], name


def _signal_children(pid: int, signo: int) -> None:
    """Signal the child processes of `pid` (strace's tracee)."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                os.kill(int(child), signo)


def _first(calls: list[tuple[int, int, str]], after: int, call: str, *parts: str) -> tuple[int, int, str]:
    """The first `call` entered after line `after` whose text holds every one of `parts`."""
    for entered, returned, text in calls:
        if entered > after and text.startswith(call) and all(part in text for part in parts):
            return entered, returned, text
    raise AssertionError(f"no {call} with {parts} after line {after}")


def test_duplicates_are_kept_once_and_echo_answers(
    native: tuple[NativeReceiver, Services], tmp_path: Path
) -> None:
    receiver, services = native
    ds = ct_dataset(tmp_path)
    for _ in range(2):
        assoc = _associate(receiver.port)
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
    _wait_indexed(services, str(ds.SeriesInstanceUID), 1)
    assert wait_for(lambda: not _landing(services), 10, interval_s=0.05)
    assert len(list((services.spool.root / "instances").rglob("*.dcm"))) == 1
    series = services.repo.get_series(str(ds.SeriesInstanceUID))
    assert series is not None and series.instance_count == 1
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="AINODE")
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_unknown_calling_ae_and_wrong_called_ae_are_rejected(native: tuple[NativeReceiver, Services]) -> None:
    receiver, _ = native
    for calling, called, reason in (("INTRUDER", "AINODE", 0x03), ("TESTSCU", "WRONG", 0x07)):
        assoc = _associate(receiver.port, calling, called)
        assert assoc.is_rejected, (calling, called)
        rejection = assoc.acceptor.primitive
        assert rejection is not None
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01, reason)
    ok = _associate(receiver.port)
    assert ok.is_established
    ok.release()


def test_connection_limits_and_setup_deadline(node_settings: NodeSettings, binary: Path) -> None:
    """Per-IP limit at TCP accept, and a connection that sends no A-ASSOCIATE-RQ is closed at its deadline
    (receive/guard.py's rules): silent peers cannot lock the port."""
    dicom = node_settings.dicom.model_copy(
        update={
            "port": free_port(),
            "receiver": "dcmtk",
            "max_associations_per_ip": 2,
            "association_setup_timeout_s": 1.0,
        }
    )
    settings = node_settings.model_copy(update={"dicom": dicom})
    services = build_services(settings, migrate="upgrade")
    receiver = NativeReceiver(settings, services.spool, services.repo, binary=binary)
    receiver.start()
    silent = [socket.create_connection(("127.0.0.1", receiver.port)) for _ in range(2)]
    try:
        third = socket.create_connection(("127.0.0.1", receiver.port))
        third.settimeout(5)
        assert third.recv(1) == b""  # closed at accept: 2 open from this address
        third.close()
        started = time.monotonic()
        for sock in silent:
            sock.settimeout(10)
            assert sock.recv(1) == b""
        assert time.monotonic() - started < 5
        assert wait_for(lambda: _associate(receiver.port).is_established, 5, interval_s=0.2)
    finally:
        for sock in silent:
            sock.close()
        receiver.stop()
        services.engine.dispose()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_instance_gets_the_python_paths_status_and_nothing_is_kept(
    name: str, native: tuple[NativeReceiver, Services], running_scp: RunningScp, tmp_path: Path
) -> None:
    receiver, services = native
    bad = bad_instance(name, tmp_path / "corpus")
    python_status = _send_file(running_scp.port, bad.path)
    native_status = _send_file(receiver.port, bad.path)
    assert native_status == python_status == bad.c_store_status, (
        f"{name}: native 0x{native_status:04X}, Python 0x{python_status:04X}"
    )
    assert _landing(services) == [] and list(services.spool.incoming.iterdir()) == []
    assert services.repo.get_series(bad.series_instance_uid) is None
    ds = ct_dataset(tmp_path / "good")  # and it keeps serving
    assoc = _associate(receiver.port)
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()


def test_padded_pixel_data_is_stored_and_dcmtk_overlong_uid_refused(
    native: tuple[NativeReceiver, Services], tmp_path: Path
) -> None:
    receiver, services = native
    ds = ct_dataset(tmp_path / "ct")
    ds.PixelData = ds.PixelData + b"\x00\x00"
    assert _send_file(receiver.port, write_part10(tmp_path / "padded.dcm", ds)) == 0x0000
    long_uid = ct_dataset(tmp_path / "long")
    long_uid.SOPInstanceUID = LONG_UID
    path = tmp_path / "long.dcm"
    long_uid.save_as(path, enforce_file_format=True)
    proc = storescu_once(receiver.port, path)
    assert "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in proc.stdout + proc.stderr
    assert services.repo.get_series(str(long_uid.SeriesInstanceUID)) is None


def test_kill9_of_the_native_process_loses_no_acknowledged_instance(
    native: tuple[NativeReceiver, Services], tmp_path: Path
) -> None:
    """The node restarts its receiver; landed files whose events died with it are found by the rescan."""
    receiver, services = native
    [batch] = plan_batches(tmp_path / "sent", batches=1, senders=2, instances_per_series=30)
    send_log = SendLog()
    senders = start_senders(["STORESCU", "TESTSCU"], "AINODE", receiver.port, send_log)
    try:
        for sender, instances in zip(senders, batch, strict=True):
            sender.enqueue(instances)
        assert send_log.wait_for_acknowledged(15, 60)
        pid = receiver.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: receiver.pid not in (None, pid), 20, interval_s=0.05), "not restarted"
        for sender in senders:
            assert sender.wait_idle(60), f"{sender.name}: {sender.pending} unacknowledged"
    finally:
        for sender in senders:
            sender.close()
    assert receiver.restarts == 1
    for instances in batch:
        _wait_indexed(services, instances[0].series_instance_uid, len(instances))
    assert wait_for(lambda: not _landing(services), 10, interval_s=0.05)
    snapshot = NodeSnapshot.read(
        str(services.engine.url.render_as_string(hide_password=False)), services.spool.root
    )
    consistency = check_consistency(snapshot, services.spool.root, send_log.acknowledged_instances())
    assert consistency.ok, consistency
    assert send_log.acknowledged == 60


def test_kill9_of_the_node_loses_nothing_and_series_are_processed(tmp_path: Path, binary: Path) -> None:
    """kill -9 of the node mid-send (its receiver dies with it, the port is free for the restart): every
    acknowledged instance has its row after recovery, the landing dir is empty, and every series is
    processed by the workers as with the Python edge (ct-lung-classical, results delivered to storescp)."""
    instances_per_series = 8
    plan = plan_batches(tmp_path / "sent", batches=1, senders=2, instances_per_series=instances_per_series)
    rules = fault_rules_file(tmp_path / "rules.yaml", instances_per_series)
    port = free_port()
    senders = ("MODALITY1", "MODALITY2")
    with storescp(tmp_path / "pacs") as pacs_port:
        extra = node_extra(rules_file=rules, dicom_port=port, pacs_port=pacs_port, calling_aes=senders)
        extra["dicom"]["receiver"] = "dcmtk"
        node = NodeProcess(
            tmp_path / "node",
            pacs_aet="PACS",
            pacs_port=pacs_port,
            dicom_port=port,
            quiet_period_s=1,
            pacs_verify=False,
            extra=extra,
        )
        node.start()
        try:
            # Seed 14: the kill comes after the 8th of 16 acknowledgements (0-20 ms later).
            figures = run_kill_rounds(node, plan, senders, random.Random(14), process_timeout_s=90)
        finally:
            node.stop()
    assert "native receiver" in node.log_tail(400)
    assert figures.rounds[0].while_sending, figures.rounds
    assert figures.consistency.ok, figures.consistency
    assert figures.unprocessed == {}, figures.unprocessed
    assert figures.acknowledged == 2 * instances_per_series
    assert not list((node.workdir / "spool" / LANDING).iterdir())


def test_recovery_gives_every_landed_file_its_row_wherever_the_crash_fell(
    node_settings: NodeSettings, tmp_path: Path
) -> None:
    """The states a kill -9 can leave a landed file in, recovered as serve does at start (orphan sweep,
    then the landing indexer): no link and no row; linked without a row; row committed but the landing
    name not yet removed; row committed but its link lost (not yet synced)."""
    services = build_services(node_settings, migrate="upgrade")
    try:
        indexer = LandingIndexer(services.spool, services.repo)
        paths = write_ct_series(tmp_path / "ct", n_slices=4, rows=32, cols=32)
        names = [os.urandom(16).hex() for _ in paths]
        landed = [indexer.directory / f"{name}.dcm" for name in names]
        for path, target in zip(paths, landed, strict=True):
            target.write_bytes(path.read_bytes())
        final = [services.spool.root / "instances" / name[:2] / f"{name}.dcm" for name in names]
        indexer.index(names[2:])  # rows committed for the last two...
        for i in (2, 3):
            os.link(final[i], landed[i])  # ...whose landing names were not removed yet,
        final[3].unlink()  # and one whose link was lost
        final[1].parent.mkdir(parents=True, exist_ok=True)
        os.link(landed[1], final[1])  # linked, no row yet
        services.spool.remove_orphans(services.repo.instance_spool_paths, services.repo.has_instance_file)
        LandingIndexer(services.spool, services.repo).recover()
        series_uid = str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        rows = services.repo.instances_of_series(series_uid)
        assert len(rows) == 4 and not _landing(services)
        assert {row.spool_path for row in rows} == {
            f.relative_to(services.spool.root).as_posix() for f in final
        }
        assert all(f.is_file() for f in final)
        stored = {stored_data_set(services.spool.path(row.spool_path)) for row in rows}
        assert stored == {stored_data_set(path) for path in paths}
        series = services.repo.get_series(series_uid)
        assert series is not None and series.instance_count == 4
    finally:
        services.engine.dispose()


def _record(series_uid: str, study_uid: str, n: int) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"{series_uid}.{n}",
        sop_class_uid=str(CTImageStorage),
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        transfer_syntax_uid=str(ExplicitVRLittleEndian),
        spool_path=f"instances/ab/{n:032x}.dcm",
        size_bytes=100,
        modality="CT",
        header={"Rows": 64},
    )


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_batch_recording_matches_one_by_one(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """SeriesRepository.record_instances (the indexer's one transaction per batch) on SQLite and
    PostgreSQL: duplicates in the database or in the batch change nothing, counts and generations as
    record_instance gives them."""
    url = (
        f"sqlite:///{tmp_path / 'batch.db'}"
        if database == "sqlite"
        else request.getfixturevalue("postgres_database")
    )
    engine = make_engine(url)
    upgrade_schema(engine)
    try:
        repo = SeriesRepository(engine)
        # Short UIDs: the instance UID adds ".n" and must stay within 64 characters.
        series_uid, study_uid = f"2.25.{random.getrandbits(64)}", f"2.25.{random.getrandbits(64)}"
        assert repo.record_instance(_record(series_uid, study_uid, 1))
        batch = [_record(series_uid, study_uid, n) for n in (1, 2, 3, 2)]
        assert repo.record_instances(batch) == [False, True, True, False]
        series = repo.get_series(series_uid)
        assert series is not None
        assert (series.instance_count, series.generation, series.header) == (3, 1, {"Rows": 64})
        assert repo.record_instances([_record(series_uid, study_uid, 1)]) == [False]
        assert len(repo.instances_of_series(series_uid)) == 3
    finally:
        engine.dispose()


def test_dicom_tls_with_the_native_receiver_is_refused(tmp_path: Path) -> None:
    from dicom_ai_node.config import load_settings

    config = tmp_path / "node.yaml"
    config.write_text(
        "dicom:\n  receiver: dcmtk\n  tls:\n    cert: c.pem\n    key: k.pem\n    require_client_cert: false\n"
    )
    with pytest.raises(ConfigError, match="receiver dcmtk does not support DICOM TLS"):
        load_settings(config, base_dir=tmp_path)
