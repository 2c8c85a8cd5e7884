"""`dicom-ai-node serve` as a process: start-up failures are one clear line, not a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import yaml

from dicom_ai_node.devtools.ports import free_port


def _serve(tmp_path: Path, dicom_port: int, http_port: int) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "dicom": {"port": dicom_port},
                "http": {"port": http_port},
                "spool_dir": str(tmp_path / "spool"),
                "database_url": f"sqlite:///{tmp_path / 'db.sqlite'}",
                "disk_reserve_mb": 0,
            }
        )
    )
    return subprocess.run(
        [sys.executable, "-m", "dicom_ai_node.cli", "serve", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )


def test_busy_ports_give_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        dicom = _serve(tmp_path, taken, free_port())
        http = _serve(tmp_path, free_port(), taken)
    assert dicom.returncode == 1 and f"error: cannot listen for DICOM on 127.0.0.1:{taken}" in dicom.stderr
    assert http.returncode == 1 and f"error: cannot listen for HTTP on 127.0.0.1:{taken}" in http.stderr
    assert "Traceback" not in dicom.stderr + http.stderr
