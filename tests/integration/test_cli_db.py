"""`dicom-ai-node db upgrade` / `db current` (the installed command, as an admin runs it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicom_ai_node.persistence.db import downgrade_schema, head_revision, make_engine, upgrade_schema

ROOT = Path(__file__).parents[2]
COMMAND = Path(sys.executable).with_name("dicom-ai-node")


def db(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(COMMAND), "db", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def _config(tmp_path: Path, database_url: str) -> Path:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"database_url": database_url, "spool_dir": str(tmp_path / "spool")}))
    return cfg


def test_db_current_and_upgrade_on_sqlite(tmp_path: Path) -> None:
    db_file = tmp_path / "var" / "node.db"
    cfg = _config(tmp_path, f"sqlite:///{db_file}")
    head = head_revision()

    missing = db(cfg, "current")
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: no database at {db_file}: run `dicom-ai-node db upgrade`"
    assert not db_file.exists() and not db_file.parent.exists()  # a read-only command created nothing

    created = db(cfg, "upgrade")
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == f"database schema upgraded empty -> {head}"
    current = db(cfg, "current")
    assert current.returncode == 0, current.stderr
    assert current.stdout.splitlines() == [f"current: {head}", f"head:    {head}", "up to date"]
    again = db(cfg, "upgrade")
    assert again.returncode == 0 and again.stdout.strip() == f"database schema is up to date ({head})"

    engine = make_engine(f"sqlite:///{db_file}")
    downgrade_schema(engine, "0001")
    engine.dispose()
    behind = db(cfg, "current")
    assert behind.returncode == 1
    assert behind.stdout.splitlines() == [
        "current: 0001",
        f"head:    {head}",
        "behind: run `dicom-ai-node db upgrade`",
    ]
    # Other read-only commands refuse with one line and leave the schema alone.
    listed = subprocess.run(
        [str(COMMAND), "jobs", "list", "-c", str(cfg)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert listed.returncode != 0
    assert listed.stderr.strip().splitlines() == [
        f"error: database schema is at 0001 but this version needs {head}: run `dicom-ai-node db upgrade`"
    ]
    upgraded = db(cfg, "upgrade")
    assert upgraded.returncode == 0 and upgraded.stdout.strip() == f"database schema upgraded 0001 -> {head}"


@pytest.mark.postgres
def test_db_current_and_upgrade_on_postgres(tmp_path: Path, postgres_database: str) -> None:
    cfg = _config(tmp_path, postgres_database)
    head = head_revision()
    assert db(cfg, "current").returncode == 0
    engine = make_engine(postgres_database)
    downgrade_schema(engine, "0001")
    engine.dispose()
    behind = db(cfg, "current")
    assert behind.returncode == 1 and behind.stdout.splitlines()[0] == "current: 0001"
    upgraded = db(cfg, "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.strip() == f"database schema upgraded 0001 -> {head}"
    assert db(cfg, "current").stdout.splitlines()[-1] == "up to date"


def test_worker_upgrades_or_refuses_by_setting(tmp_path: Path) -> None:
    import signal
    import time

    db_file = tmp_path / "node.db"
    engine = make_engine(f"sqlite:///{db_file}")
    upgrade_schema(engine, "0001")
    engine.dispose()
    head = head_revision()
    cfg = tmp_path / "node.yaml"
    settings = {"database_url": f"sqlite:///{db_file}", "spool_dir": str(tmp_path / "spool")}

    cfg.write_text(yaml.safe_dump({**settings, "auto_upgrade_schema": False}))
    refused = subprocess.run(
        [str(COMMAND), "worker", "-c", str(cfg)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines() == [
        f"error: database schema is at 0001 but this version needs {head}: run `dicom-ai-node db upgrade`"
    ]

    cfg.write_text(yaml.safe_dump({**settings, "auto_upgrade_schema": True}))
    proc = subprocess.Popen(
        [str(COMMAND), "worker", "-c", str(cfg)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 120
        lines: list[str] = []
        assert proc.stderr is not None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "database schema" in line:
                break
        assert any(f"database schema upgraded 0001 -> {head}" in line for line in lines), lines
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert db(cfg, "current").returncode == 0
