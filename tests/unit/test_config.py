from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicom_ai_node.config import load_settings
from dicom_ai_node.errors import ConfigError

ROOT = Path(__file__).parents[2]


def test_example_config_loads() -> None:
    s = load_settings(ROOT / "config" / "node.yaml", base_dir=ROOT)
    assert s.ae_title == "AINODE"
    assert s.dicom.allow_any_peer is False and s.dicom.allowed_peers
    assert s.destination("pacs").port == 4242
    assert s.database_url.startswith("sqlite:////")  # resolved to an absolute path


def test_env_overrides_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AINODE_DICOM__PORT", "11999")
    monkeypatch.setenv("AINODE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/x")
    s = load_settings(ROOT / "config" / "node.yaml", base_dir=ROOT)
    assert s.dicom.port == 11999 and s.database_url.startswith("postgresql://")


@pytest.mark.parametrize(
    "yaml_text,key",
    [
        ("dicom:\n  port: 70000\n", "dicom.port"),
        ("ae_title: THIS_AE_TITLE_IS_TOO_LONG\n", "ae_title"),
        ("database_url: mysql://x\n", "database_url"),
        (
            "dicom:\n  allowed_peers:\n    - ae_title: PACS\n      hosts: [not-an-ip]\n",
            "dicom.allowed_peers.0.hosts",
        ),
        # A dicom destination without a port; a dicomweb one without or with a bad url.
        ("destinations:\n  - name: pacs\n    ae_title: ORTHANC\n    host: 127.0.0.1\n", "destinations.0"),
        ("destinations:\n  - name: web\n    type: dicomweb\n", "destinations.0"),
        ("destinations:\n  - name: web\n    type: dicomweb\n    url: ftp://x\n", "destinations.0.url"),
        ("unknown_key: 1\n", "unknown_key"),
        ("worker:\n  lease_s: 10\n  heartbeat_s: 10\n", "worker"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, base_dir=tmp_path)
    assert info.value.key == key


def test_cli_exits_nonzero_with_one_clear_line(tmp_path: Path) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text("dicom:\n  port: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dicom_ai_node.cli", "jobs", "list", "-c", str(cfg)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: config error at 'dicom.port'")
