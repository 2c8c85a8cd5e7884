"""Denial of service on the DICOM port, tried as a hostile peer would on loopback: garbage, partial PDUs,
silent floods and a greedy allowed AE must not keep a legitimate peer's C-ECHO out, and each kind of
refusal is logged without one line per connection. Attackers connect from 127.0.0.2+ (all of 127/8 is
loopback on Linux) so the per-IP limit tells them from the legitimate peer on 127.0.0.1."""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.node import build_services
from dicom_ai_node.receive.scp import StorageSCP

SETUP_TIMEOUT_S = 1.0
PDU_TIMEOUT_S = 1.0
PER_IP = 4
PER_AE = 3
TOTAL = 10
# A legitimate C-ECHO must get through within this long while an attack runs (before: >= 120 s refused).
ECHO_BOUND_S = SETUP_TIMEOUT_S + 2.0


@pytest.fixture
def scp(node_settings: NodeSettings) -> Iterator[StorageSCP]:
    dicom = node_settings.dicom.model_copy(
        update={
            "max_associations": TOTAL,
            "max_associations_per_ip": PER_IP,
            "max_associations_per_ae": PER_AE,
            "association_setup_timeout_s": SETUP_TIMEOUT_S,
            "pdu_timeout_s": PDU_TIMEOUT_S,
        }
    )
    settings = node_settings.model_copy(update={"dicom": dicom})
    services = build_services(settings, migrate="upgrade")
    node = StorageSCP(settings, services.spool, services.repo)
    node.start()
    yield node
    node.stop()


def _attacker(port: int, source_ip: str, payload: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source_ip, 0))
    if payload:
        sock.sendall(payload)
    return sock


def _closed_by_node(sock: socket.socket, within_s: float) -> bool:
    """True when the node closes (or resets) the connection within `within_s`."""
    sock.settimeout(within_s)
    try:
        while sock.recv(4096):  # an A-ABORT may come first; then the close
            pass
    except TimeoutError:
        return False
    except OSError:
        return True  # reset
    return True


def _echo(port: int, calling: str = "TESTSCU", source_ip: str = "127.0.0.1") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    ae.network_timeout = 5
    return ae.associate("127.0.0.1", port, ae_title="AINODE", bind_address=(source_ip, 0))


def _echo_until_ok(port: int, bound_s: float = ECHO_BOUND_S) -> float:
    """Seconds until a legitimate C-ECHO succeeded (retrying as a PACS would), or fails the test."""
    start = time.monotonic()
    while time.monotonic() - start < bound_s:
        assoc = _echo(port)
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            if status is not None and status.Status == 0x0000:
                return time.monotonic() - start
        time.sleep(0.1)
    pytest.fail(f"no successful C-ECHO within {bound_s} s")


def _refusal_lines(caplog: pytest.LogCaptureFixture, ip: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "dicom_ai_node.receive.guard" and r.levelno == logging.WARNING and ip in r.getMessage()
    ]


# A-ASSOCIATE-RQ header declaring 1000 bytes, plus 2 of them: the node waits for the other 998.
PARTIAL_RQ = struct.pack(">BBL", 0x01, 0x00, 1000) + b"\x00\x01"


def test_partial_pdu_flood_from_one_address_does_not_lock_out_a_legitimate_peer(
    scp: StorageSCP, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    attackers = [_attacker(scp.port, "127.0.0.2", PARTIAL_RQ) for _ in range(40)]
    try:
        elapsed = _echo_until_ok(scp.port, bound_s=1.0)  # the attacker has only PER_IP slots
        assert elapsed < 1.0
        # Every one is closed: those over the limit at once, the others at the setup deadline.
        start = time.monotonic()
        assert all(_closed_by_node(s, SETUP_TIMEOUT_S + 2) for s in attackers)
        assert time.monotonic() - start < SETUP_TIMEOUT_S + 2
    finally:
        for s in attackers:
            s.close()
    lines = _refusal_lines(caplog, "127.0.0.2")
    assert any("refused" in line and "from this address" in line for line in lines)
    assert 1 <= len(lines) <= 3, lines  # rate-limited: not one line per connection


def test_partial_pdu_flood_from_many_addresses_frees_every_slot_at_the_setup_deadline(
    scp: StorageSCP, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    attackers = [
        _attacker(scp.port, f"127.0.0.{2 + i % 10}", PARTIAL_RQ if i % 2 else b"") for i in range(40)
    ]  # half partial PDUs, half silent: every slot of the node taken
    try:
        elapsed = _echo_until_ok(scp.port)
        assert elapsed < ECHO_BOUND_S
        assert all(_closed_by_node(s, SETUP_TIMEOUT_S + 2) for s in attackers)
    finally:
        for s in attackers:
            s.close()
    assert any("in total" in line for line in _refusal_lines(caplog, "127.0.0."))
    assert any("no association within" in line for line in _refusal_lines(caplog, "127.0.0."))


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack(">BBL", 0x04, 0x00, 0xFFFFFF00) + bytes(range(256)) * 4,  # a P-DATA "header" first
        bytes((i * 37 + 11) % 256 for i in range(1024)),  # not a PDU type at all
    ],
    ids=["declares-4GiB", "unknown-pdu-type"],
)
def test_garbage_is_disconnected_within_the_deadline(scp: StorageSCP, garbage: bytes) -> None:
    start = time.monotonic()
    sock = _attacker(scp.port, "127.0.0.2", garbage)
    try:
        assert _closed_by_node(sock, SETUP_TIMEOUT_S + 2)  # before: held for more than 100 s
        assert time.monotonic() - start < SETUP_TIMEOUT_S + 2
    finally:
        sock.close()
    _echo_until_ok(scp.port, bound_s=1.0)


def test_a_greedy_allowed_ae_gets_only_its_share(scp: StorageSCP) -> None:
    held: list[Any] = []
    try:
        for i in range(PER_AE):  # from distinct addresses, so only the per-AE limit applies
            assoc = _echo(scp.port, calling="STORESCU", source_ip=f"127.0.0.{2 + i}")
            assert assoc.is_established
            held.append(assoc)
        extra = _echo(scp.port, calling="STORESCU", source_ip="127.0.0.9")
        assert extra.is_rejected
        rj = extra.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit
        assert _echo_until_ok(scp.port, bound_s=1.0) < 1.0  # another AE still gets in
    finally:
        for assoc in held:
            assoc.release()
    # Released slots count again, as soon as the node has seen the releases.
    deadline = time.monotonic() + 1.0
    while True:
        again = _echo(scp.port, calling="STORESCU", source_ip="127.0.0.9")
        if again.is_established or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert again.is_established
    again.release()


def test_an_established_association_whose_pdu_stalls_is_aborted(scp: StorageSCP) -> None:
    assoc = _echo(scp.port, calling="STORESCU", source_ip="127.0.0.2")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 0x04, 0x00, 5000) + b"\x00" * 10)  # P-DATA-TF, 10 of 5000 bytes
    deadline = time.monotonic() + PDU_TIMEOUT_S + 2
    while time.monotonic() < deadline and assoc.is_alive():
        time.sleep(0.05)
    assert not assoc.is_alive() and not assoc.is_established
