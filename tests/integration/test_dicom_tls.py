"""DICOM TLS (PS3.15 B.9, BCP 195) on the SCP and to a destination, over loopback with real peers: DCMTK
storescu/storescp with --tls and pynetdicom over ssl; certificates made by openssl in the test."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_ai_node.config import NodeSettings, load_settings
from dicom_ai_node.deliver.registry import deliverer_for
from dicom_ai_node.devtools.dcmtk import DCMTK_ENV
from dicom_ai_node.devtools.ports import free_port, wait_port
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.dimse_socket import client_tls_context
from dicom_ai_node.domain.peers import AllowedPeer, Destination, DestinationTls
from dicom_ai_node.errors import ConfigError, DeliveryError, PermanentDeliveryError
from dicom_ai_node.node import Services, build_services
from dicom_ai_node.receive.scp import StorageSCP
from tests.support.tls_certs import Cert, Pki, make_pki

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_scp(node_settings: NodeSettings, pki: Pki) -> Iterator[tuple[StorageSCP, Services]]:
    peers = [
        # Bound by subject (written in RFC 4514 order: the attributes' order does not matter).
        AllowedPeer(ae_title="STORESCU", tls_subject="CN=STORESCU,O=Test"),
        # Bound by fingerprint, as openssl prints it.
        AllowedPeer(ae_title="TESTSCU", hosts=["127.0.0.1"], tls_fingerprint=pki.testscu.sha256_colons()),
        # Not bound: any certificate the CA signed.
        AllowedPeer(ae_title="ANYCERT"),
    ]
    tls = {"cert": pki.server.cert, "key": pki.server.key, "ca": pki.ca.cert, "handshake_timeout_s": 2}
    dicom = node_settings.dicom.model_copy(update={"allowed_peers": peers})
    settings = node_settings.model_copy(
        update={"dicom": NodeSettings(dicom={**dicom.model_dump(), "tls": tls}).dicom}
    )
    services = build_services(settings, migrate="upgrade")
    scp = StorageSCP(settings, services.spool, services.repo)
    scp.start()
    try:
        yield scp, services
    finally:
        scp.stop()


def _tls_assoc(port: int, calling: str, client: Cert | None, ca: Cert) -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    context = client_tls_context(ca.cert, client.cert if client else None, client.key if client else None)
    return ae.associate("127.0.0.1", port, ae_title="AINODE", tls_args=(context, "127.0.0.1"))


def _storescu_tls(
    files: list[Path], port: int, calling: str, client: Cert, ca: Cert
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            STORESCU, "-aet", calling, "-aec", "AINODE",
            "+tls", str(client.key), str(client.cert), "+cf", str(ca.cert),
            "127.0.0.1", str(port), *map(str, files),
        ],
        capture_output=True, text=True, env=DCMTK_ENV, timeout=120,
    )  # fmt: skip


def _series_count(services: Services, files: list[Path]) -> int:
    row = services.repo.get_series(str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID))
    return 0 if row is None else row.instance_count


def test_dcmtk_supports_tls() -> None:
    out = subprocess.run([STORESCU, "--help"], capture_output=True, text=True).stdout
    assert "+tls" in out and "bcp195" in out.lower()


def test_storescu_over_tls_is_stored(tls_scp: tuple[StorageSCP, Services], pki: Pki, tmp_path: Path) -> None:
    scp, services = tls_scp
    files = write_ct_series(tmp_path / "ct", n_slices=3)
    proc = _storescu_tls(files, scp.port, "STORESCU", pki.storescu, pki.ca)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _series_count(services, files) == 3


def test_pynetdicom_over_tls_is_stored(
    tls_scp: tuple[StorageSCP, Services], pki: Pki, tmp_path: Path
) -> None:
    scp, services = tls_scp
    files = write_ct_series(tmp_path / "ct", n_slices=2)
    for calling, cert in (("TESTSCU", pki.testscu), ("ANYCERT", pki.storescu)):
        assoc = _tls_assoc(scp.port, calling, cert, pki.ca)
        assert assoc.is_established, calling
        assert assoc.send_c_echo().Status == 0x0000
        assert [assoc.send_c_store(dcmread(f)).Status for f in files] == [0x0000, 0x0000]
        assoc.release()
    assert _series_count(services, files) == 2


def test_unknown_or_missing_client_certificate_fails_the_handshake(
    tls_scp: tuple[StorageSCP, Services], pki: Pki, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    scp, services = tls_scp
    caplog.set_level(logging.WARNING)
    for cert in (pki.stranger, None):
        assoc = _tls_assoc(scp.port, "STORESCU", cert, pki.ca)
        assert not assoc.is_established
    files = write_ct_series(tmp_path / "ct", n_slices=1)
    proc = _storescu_tls(files, scp.port, "STORESCU", pki.stranger, pki.ca)
    assert proc.returncode != 0
    assert _series_count(services, files) == 0
    _wait_for(lambda: caplog.text.count("DICOM TLS handshake with 127.0.0.1 refused") >= 3, caplog)


def test_plain_tcp_is_refused_and_a_silent_peer_blocks_no_one(
    tls_scp: tuple[StorageSCP, Services], pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    scp, _ = tls_scp
    caplog.set_level(logging.WARNING)
    plain = AE(ae_title="STORESCU")
    plain.add_requested_context(Verification)
    plain.acse_timeout = 5
    assert not plain.associate("127.0.0.1", scp.port, ae_title="AINODE").is_established
    # Connections that never start a handshake wait in their own threads, not in the accept loop.
    silent = [socket.create_connection(("127.0.0.1", scp.port)) for _ in range(5)]
    try:
        started = time.monotonic()
        assoc = _tls_assoc(scp.port, "TESTSCU", pki.testscu, pki.ca)
        assert assoc.is_established and time.monotonic() - started < 2
        assoc.release()
        # ... and are closed at the handshake deadline (2 s here).
        for sock in silent:
            sock.settimeout(10)
            assert sock.recv(1) == b""
    finally:
        for sock in silent:
            sock.close()


def test_certificate_of_another_peer_is_rejected(
    tls_scp: tuple[StorageSCP, Services], pki: Pki, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    scp, services = tls_scp
    # A valid certificate (same CA) whose subject / fingerprint is bound to another AE title.
    assert _tls_assoc(scp.port, "STORESCU", pki.testscu, pki.ca).is_rejected
    assert _tls_assoc(scp.port, "TESTSCU", pki.storescu, pki.ca).is_rejected
    files = write_ct_series(tmp_path / "ct", n_slices=1)
    proc = _storescu_tls(files, scp.port, "TESTSCU", pki.storescu, pki.ca)
    assert proc.returncode != 0 and _series_count(services, files) == 0
    assert "not allowed with this TLS client certificate" in caplog.text


def _wait_for(condition: Any, caplog: pytest.LogCaptureFixture, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.05)


@pytest.fixture
def tls_storescp(pki: Pki, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp over TLS (BCP 195 profile), requiring a client certificate from our CA."""
    out = tmp_path / "pacs"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [
            STORESCP, "-aet", "PACS", "-od", str(out),
            "+tls", str(pki.server.key), str(pki.server.cert), "+cf", str(pki.ca.cert),
            str(port),
        ],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port)
        yield port, out
    finally:
        proc.terminate()
        proc.wait()


def _destination(port: int, tls: DestinationTls | None) -> Destination:
    return Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port, timeout_s=10, tls=tls)


def test_delivery_to_a_tls_storescp(tls_storescp: tuple[int, Path], pki: Pki, tmp_path: Path) -> None:
    port, out = tls_storescp
    tls = DestinationTls(ca=pki.ca.cert, cert=pki.storescu.cert, key=pki.storescu.key)
    deliverer = deliverer_for(_destination(port, tls), "AINODE")
    assert "status 0x0000" in deliverer.probe()  # C-ECHO over TLS
    files = write_ct_series(tmp_path / "ct", n_slices=2)
    report = deliverer.send(files)
    assert len(report.sent) == 2
    assert len([p for p in out.iterdir() if p.is_file()]) == 2
    # The C-FIND read-back goes over TLS too: storescp negotiates it and offers no C-FIND.
    ds = dcmread(files[0], stop_before_pixels=True)
    with pytest.raises(PermanentDeliveryError, match="accepts none"):
        deliverer.held(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))


def test_delivery_refuses_an_untrusted_or_plain_peer(
    tls_storescp: tuple[int, Path], pki: Pki, tmp_path: Path
) -> None:
    port, out = tls_storescp
    files = write_ct_series(tmp_path / "ct", n_slices=1)
    # The PACS's certificate does not chain to the CA we trust.
    other_ca = DestinationTls(ca=pki.stranger.cert, cert=pki.storescu.cert, key=pki.storescu.key)
    # Without TLS the TLS-only storescp never answers an association.
    for tls in (other_ca, None):
        with pytest.raises(DeliveryError):
            deliverer_for(_destination(port, tls), "AINODE").send(files)
    missing = DestinationTls(ca=tmp_path / "missing.pem")
    with pytest.raises(PermanentDeliveryError, match="cannot load"):
        deliverer_for(_destination(port, missing), "AINODE").probe()
    assert [p for p in out.iterdir() if p.is_file()] == []


def test_tls_config_errors_name_the_key(tmp_path: Path) -> None:
    cases = {
        "dicom:\n  allowed_peers: [{ae_title: A, tls_subject: 'CN=A'}]\n": "dicom",
        "dicom:\n  tls: {cert: c.pem, key: k.pem}\n": "dicom.tls",
        "dicom:\n  tls: {cert: c.pem, key: k.pem, ca: ca.pem}\n  allowed_peers: [{ae_title: A, tls_fingerprint: 'AB:CD'}]\n": (
            "dicom.allowed_peers.0.tls_fingerprint"
        ),
        "dicom:\n  tls: {cert: c.pem, key: k.pem, ca: ca.pem}\n  allowed_peers: [{ae_title: A, tls_subject: 'STORESCU'}]\n": (
            "dicom.allowed_peers.0.tls_subject"
        ),
        "destinations: [{name: p, ae_title: P, host: h, port: 1, tls: {ca: ca.pem, cert: c.pem}}]\n": (
            "destinations.0.tls"
        ),
    }
    for text, key in cases.items():
        cfg = tmp_path / "node.yaml"
        cfg.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_settings(cfg)
        assert err.value.key == key, (text, str(err.value))
    cfg.write_text("dicom:\n  tls: {cert: c.pem, key: k.pem, ca: ca.pem}\n")
    settings = load_settings(cfg, base_dir=tmp_path)
    assert settings.dicom.tls is not None and settings.dicom.tls.cert == tmp_path / "c.pem"


def test_unreadable_tls_files_stop_the_scp_with_the_key(node_settings: NodeSettings, tmp_path: Path) -> None:
    tls = {"cert": tmp_path / "none.pem", "key": tmp_path / "none.key", "ca": tmp_path / "ca.pem"}
    settings = node_settings.model_copy(
        update={"dicom": NodeSettings(dicom={**node_settings.dicom.model_dump(), "tls": tls}).dicom}
    )
    services = build_services(settings, migrate="upgrade")
    with pytest.raises(ConfigError, match="dicom.tls"):
        StorageSCP(settings, services.spool, services.repo).start()
