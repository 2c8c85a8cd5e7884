"""A hung model: killed at its timeout, retried with backoff, then dead-lettered; the node keeps serving.

The model is a user model registered as docs/user-models.md says (a directory in `models.paths` with a
manifest.yaml) whose Python class lives in a module of the site's own, on the node's PYTHONPATH. Each
time it runs it starts a helper process (as a model's data loader would) and then sleeps for an hour.
The node runs as its own process (`dicom-ai-node serve`, SQLite) with `models.inference_timeout_s: 2`
and `worker.max_attempts: 3`; the destination is DCMTK's storescp.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from dicom_ai_node.devtools.dcmtk import storescp, storescu
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.orthanc import wait_for
from dicom_ai_node.devtools.synthetic import write_ct_series, write_mr_series

pytestmark = pytest.mark.e2e

HUNG_MODEL = "hang-forever"
WORKING_MODEL = "ct-lung-classical"
TIMEOUT_S = 2
MAX_ATTEMPTS = 3
VERIFICATION = "1.2.840.10008.1.1"

HANGING_MODULE = '''
"""A site's own model class that never returns (a deadlocked call, an endless loop)."""

import os
import subprocess
import time

from dicom_ai_node.domain.results import ModelIdentity


class HangForever:
    task = "segmentation"
    accepts_modalities = ("MR",)

    def __init__(self, manifest, device="cpu"):
        self.identity = ModelIdentity(manifest.name, manifest.version, description=manifest.description)
        self.segments = manifest.segment_specs

    def segment(self, volume):
        # A helper process of the model's own: the timeout must kill it too (the child's process group).
        helper = subprocess.Popen(["sleep", "3600"])
        with open(os.environ["AINODE_TEST_HANG_PIDS"], "a") as out:
            out.write(f"{time.time():.3f} {os.getpid()} {helper.pid}\\n")
        time.sleep(3600)
        raise AssertionError("unreachable")
'''


def _write_user_model(root: Path) -> tuple[Path, Path]:
    """(models path, Python path): the hanging model's manifest directory and the module's folder."""
    python_dir = root / "site-python"
    python_dir.mkdir(parents=True)
    (python_dir / "ainode_site_models.py").write_text(textwrap.dedent(HANGING_MODULE))
    model_dir = root / "models" / HUNG_MODEL
    model_dir.mkdir(parents=True)
    manifest = {
        "name": HUNG_MODEL,
        "version": "0.1.0",
        "task": "segmentation",
        "format": "builtin",
        "entry": "ainode_site_models:HangForever",
        "description": "a model that never returns (fault test)",
        "accepts": {"modalities": ["MR"]},
        "outputs": {
            "activation": "none",
            "segments": [
                {
                    "value": 1,
                    "label": "Brain",
                    "type": {"value": "12738006", "scheme": "SCT", "meaning": "Brain"},
                }
            ],
        },
        "licence": "test only",
        "training_data": "none",
        "intended_use": "fault test",
    }
    (model_dir / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return root / "models", python_dir


def _rules(path: Path) -> Path:
    def rule(rule_id: str, modality: str, model: str) -> dict[str, Any]:
        return {
            "id": rule_id,
            "version": 1,
            "conditions": [{"attribute": "Modality", "equals": modality}],
            "action": {"model": model, "destinations": ["pacs"], "quiet_period_s": 1},
        }

    rules = [rule("mr-hangs", "MR", HUNG_MODEL), rule("ct-lungs", "CT", WORKING_MODEL)]
    path.write_text(yaml.safe_dump({"rules": rules}, sort_keys=False))
    return path


def _process_state(pid: int) -> str | None:
    """The state letter in /proc/PID/stat (R, S, Z...), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _descendants(pid: int) -> dict[int, str]:
    """Live (non-zombie) descendants of `pid` and their command lines."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found: dict[int, str] = {}
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found.keys()
        for child in frontier:
            try:
                found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                found[child] = "?"
    return found


def _log_times(node: NodeProcess, fragment: str) -> list[float]:
    """Timestamps (epoch seconds) of the node's log lines containing `fragment`."""
    times = []
    for line in node.log_path.read_text(errors="replace").splitlines():
        if fragment in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            times.append(stamp.timestamp())
    return times


def _echo(node: NodeProcess) -> int:
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def test_hung_model_is_killed_at_its_timeout_retried_then_dead_lettered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models_path, python_dir = _write_user_model(tmp_path / "site")
    pids_file = tmp_path / "hang-pids.txt"
    # The node (and the inference process it spawns) find the site's module and where to note its pids.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(python_dir), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("AINODE_TEST_HANG_PIDS", str(pids_file))
    received = tmp_path / "pacs"
    recorded: list[tuple[float, int, int]] = []
    with storescp(received) as pacs_port:
        node = NodeProcess(
            tmp_path / "node",
            pacs_aet="PACS",
            pacs_port=pacs_port,
            quiet_period_s=1,
            pacs_verify=False,  # storescp has no C-FIND
            extra={
                "rules_file": str(_rules(tmp_path / "rules.yaml")),
                "models": {"device": "cpu", "paths": [str(models_path)], "inference_timeout_s": TIMEOUT_S},
                "worker": {
                    "lease_s": 20,
                    "heartbeat_s": 2,
                    "poll_interval_s": 0.2,
                    "backoff_base_s": 1,
                    "backoff_cap_s": 2,
                    "max_attempts": MAX_ATTEMPTS,
                },
            },
        )
        try:
            node.start()
            study = generate_uid()
            mr = write_mr_series(tmp_path / "mr", n_slices=4, rows=32, cols=32, study_instance_uid=study)
            mr_uid = str(dcmread(mr[0], stop_before_pixels=True).SeriesInstanceUID)
            sent_at = time.time()
            storescu(mr, node.ae_title, node.dicom_port)

            def dead_job() -> dict[str, Any] | None:
                jobs = [j for j in node.jobs(kind="infer") if j["payload"]["series_instance_uid"] == mr_uid]
                return jobs[0] if jobs and jobs[0]["status"] == "dead" else None

            job = wait_for(
                dead_job, 120, what=f"the hung model's job to reach the dead letter\n{node.log_tail()}"
            )
            dead_at = time.time()
            recorded = [
                (float(t), int(child), int(helper))
                for t, child, helper in (line.split() for line in pids_file.read_text().splitlines())
            ]
            kills = _log_times(node, f"model {HUNG_MODEL} exceeded {TIMEOUT_S} s on series {mr_uid}")
            retries = _log_times(node, "(infer) attempt")

            # Killed at the timeout each time, retried with backoff, dead after MAX_ATTEMPTS.
            assert job["attempts"] == MAX_ATTEMPTS, job
            assert len(recorded) == MAX_ATTEMPTS and len(kills) == MAX_ATTEMPTS, (recorded, kills)
            # A fresh inference process each attempt (the killed one is never reused).
            assert len({child for _, child, _ in recorded}) == MAX_ATTEMPTS
            ran_for = [kill - start for (start, _, _), kill in zip(recorded, kills, strict=True)]
            assert all(TIMEOUT_S - 0.2 <= s <= TIMEOUT_S + 3 for s in ran_for), ran_for
            gaps = [nxt - kill for kill, (nxt, _, _) in zip(kills, recorded[1:], strict=False)]
            assert all(g >= 0.5 for g in gaps), gaps  # backoff: base 1 s, full jitter from half of it
            error = job["last_error"]
            assert error.startswith("InferenceTimeoutError: ") and f"model {HUNG_MODEL}" in error, error
            assert f"within {TIMEOUT_S} s" in error and mr_uid in error and "killed" in error, error
            assert len(retries) == MAX_ATTEMPTS

            # Nothing of the hung model is left running: not its processes, not the helpers they started.
            time.sleep(0.5)
            for _, child, helper in recorded:
                assert _process_state(child) in (None, "Z"), f"inference process {child} still runs"
                assert _process_state(helper) in (None, "Z"), f"the model's helper {helper} still runs"
            assert node.proc is not None
            strays = {pid: cmd for pid, cmd in _descendants(node.proc.pid).items() if "spawn_main" in cmd}
            assert strays == {}, strays

            # The node keeps serving: C-ECHO, and another series goes all the way to the destination.
            assert _echo(node) == 0x0000
            ct = write_ct_series(
                tmp_path / "ct",
                n_slices=8,
                rows=48,
                cols=48,
                pixel_spacing=(6.0, 6.0),
                slice_thickness=10.0,
                study_instance_uid=study,
            )
            ct_uid = str(dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID)
            storescu(ct, node.ae_title, node.dicom_port)

            def delivered() -> list[dict[str, Any]] | None:
                jobs = [j for j in node.jobs() if j["payload"].get("series_instance_uid") == ct_uid]
                done = len(jobs) == 2 and all(j["status"] in ("succeeded", "dead") for j in jobs)
                return jobs if done else None

            ct_jobs = wait_for(delivered, 120, what=f"the CT series' results\n{node.log_tail()}")
            assert [j["status"] for j in ct_jobs] == ["succeeded", "succeeded"], ct_jobs
            assert node.running
        finally:
            node.stop()
            for _, child, helper in recorded:  # never leave a helper behind, whatever failed above
                for pid in (child, helper):
                    if _process_state(pid) not in (None, "Z"):
                        os.kill(pid, 9)

    # Only the CT series' results reached the destination; the hung series sent nothing.
    modalities = Counter(dcmread(f, stop_before_pixels=True).Modality for f in received.iterdir())
    assert modalities == {"SEG": 1, "SR": 1}, modalities
    figures = {
        "attempts": job["attempts"],
        "model_ran_for_s": [round(s, 2) for s in ran_for],
        "backoff_s": [round(g, 2) for g in gaps],
        "sent_to_dead_s": round(dead_at - sent_at, 1),
        "last_error": error,
    }
    print("FIGURES hung-model", json.dumps(figures))
