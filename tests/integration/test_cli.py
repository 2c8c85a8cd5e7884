"""The `dicom-ai-node` command line against real peers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pydicom import dcmread

from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.domain.jobs import JobKind

ROOT = Path(__file__).parents[2]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_ai_node.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_echo_and_send_to_the_node_scp(running_scp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    peer = f"AINODE@127.0.0.1:{running_scp.port}"
    echo = cli("echo", peer, "--calling-aet", "TESTSCU")
    assert echo.returncode == 0 and "status 0x0000" in echo.stdout
    files = write_ct_series(tmp_path / "ct", n_slices=4)
    sent = cli("send", str(tmp_path / "ct"), "--to", peer, "--calling-aet", "TESTSCU")
    assert sent.returncode == 0, sent.stderr
    assert "sent 4 instances" in sent.stdout
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert running_scp.services.repo.get_series(uid).instance_count == 4


def test_send_to_a_closed_port_fails_cleanly(tmp_path: Path) -> None:
    from tests.conftest import free_port

    write_ct_series(tmp_path / "ct", n_slices=1)
    result = cli("send", str(tmp_path / "ct"), "--to", f"PACS@127.0.0.1:{free_port()}")
    assert result.returncode == 1 and "error: cannot associate" in result.stderr
    bad = cli("echo", "not-a-peer")
    assert bad.returncode == 2 and "AET@HOST:PORT" in bad.stderr


def test_rules_validate(tmp_path: Path) -> None:
    ok = cli("rules", "validate", "config/rules.yaml", "-c", "config/node.yaml")
    assert ok.returncode == 0 and "2 rules OK" in ok.stdout
    broken = tmp_path / "rules.yaml"
    broken.write_text(
        "rules:\n  - id: x\n    conditions: [{attribute: Modality, regex: '('}]\n"
        "    action: {model: mr-brain, destinations: [pacs]}\n"
    )
    bad = cli("rules", "validate", str(broken), "-c", "config/node.yaml")
    assert bad.returncode == 1 and "invalid regex" in bad.stderr


def test_jobs_list_and_retry(node_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import yaml

    from dicom_ai_node.node import build_services

    services = build_services(node_settings, migrate="upgrade")
    job_id = services.queue.enqueue(JobKind.DELIVER, {"destination": "pacs", "files": []})
    claimed = services.queue.claim("w1", [JobKind.DELIVER], 60)
    assert claimed is not None
    services.queue.fail(claimed.id, "w1", "PermanentDeliveryError: association rejected", permanent=True)
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"database_url": node_settings.database_url, "spool_dir": str(node_settings.spool_dir)}
        )
    )
    listed = cli("jobs", "list", "-c", str(cfg), "--status", "dead")
    assert listed.returncode == 0 and f"{job_id}" in listed.stdout and "association rejected" in listed.stdout
    assert cli("jobs", "retry", str(job_id), "-c", str(cfg)).returncode == 0
    retried = services.queue.get(job_id)
    assert retried is not None and retried.status.value == "queued"
    again = cli("jobs", "retry", str(job_id), "-c", str(cfg))
    assert again.returncode == 1 and "not dead or failed" in again.stderr
