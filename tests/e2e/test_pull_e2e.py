"""Pull from a real Orthanc: studies Orthanc holds and never forwarded are processed by `dicom-ai-node pull`
over C-MOVE, C-GET and WADO-RS, each ending in SEG + SR in Orthanc; pulling again (CLI, and a `pull` job
through the admin API) makes no second job and no second SEG/SR; a study Orthanc lacks is one line, exit 1.

The studies go into Orthanc with the node's own calling AE title, which the Lua auto-forward skips (its
loop guard), so the node only ever sees them by pulling.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest

from dicom_ai_node.devtools.datasets import SeriesInfo, lung_ct_series
from dicom_ai_node.devtools.dcmtk import storescu
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.orthanc import OrthancServer, wait_for
from dicom_ai_node.devtools.repo import ROOT
from dicom_ai_node.devtools.stack import orthanc_with_node

pytestmark = pytest.mark.e2e

TIMEOUT_S = 240
# 20 chest slices: the default CT rule wants at least 20 instances; fewer frames keep inference short.
FRAMES = slice(14, 34)
METHODS = {"move": "orthanc-move", "get": "orthanc-get", "wado": "orthanc-web"}


def _sources(orthanc: OrthancServer) -> dict[str, Any]:
    dimse = {"type": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    return {
        "sources": [
            {"name": "orthanc-move", **dimse, "retrieve": "move", "timeout_s": 30},
            {"name": "orthanc-get", **dimse, "retrieve": "get", "timeout_s": 30},
            {"name": "orthanc-web", "type": "dicomweb", "url": orthanc.dicomweb_url, "timeout_s": 30},
        ]
    }


def _cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_ai_node.cli", *args, "-c", str(node.config_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _results(orthanc: OrthancServer, study_uid: str) -> dict[str, int]:
    """Instances per result modality in the study."""
    return {
        modality: sum(len(s["Instances"]) for s in orthanc.series_by_modality(study_uid, modality))
        for modality in ("SEG", "SR")
    }


def _jobs_of(node: NodeProcess, series_uid: str, kind: str) -> list[dict[str, Any]]:
    return node.jobs(limit=200, kind=kind, series_instance_uid=series_uid)


@pytest.fixture(scope="module")
def pulled(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("pull")
    with orthanc_with_node(work, node_extra=_sources) as (orthanc, node):
        studies: dict[str, SeriesInfo] = {}
        for method in METHODS:
            studies[method] = lung_ct_series(work / method, "lung1", frames=FRAMES)
            # Sent as the node's AE: the auto-forward's loop guard leaves these series in Orthanc alone.
            storescu(list(studies[method].paths), orthanc.aet, orthanc.dicom_port, node.ae_title)
        outputs = {}
        for method, source in METHODS.items():
            outputs[method] = _cli(
                node, "pull", "--study", studies[method].study_instance_uid, "--from", source
            )
        for method, info in studies.items():

            def has_results(study_instance_uid: str = info.study_instance_uid) -> bool:
                return _results(orthanc, study_instance_uid) == {"SEG": 1, "SR": 1}

            orthanc.wait_for(
                has_results,
                TIMEOUT_S,
                what=f"SEG + SR of the study pulled over {method}\nnode log:\n{node.log_tail()}",
            )
        yield {"orthanc": orthanc, "node": node, "studies": studies, "outputs": outputs, "work": work}


@pytest.mark.parametrize("method", list(METHODS))
def test_pull_processes_a_study_the_pacs_never_forwarded(pulled, method: str) -> None:  # type: ignore[no-untyped-def]
    node: NodeProcess = pulled["node"]
    info: SeriesInfo = pulled["studies"][method]
    out = pulled["outputs"][method]
    assert out.returncode == 0, out.stderr
    summary = out.stdout.strip().splitlines()[-1]
    n = len(info.paths)
    assert f"{n} of {n} instances in 1 series ({n} new, 0 already here)" in summary, summary
    series = node.get_json(f"/api/series/{info.series_instance_uid}")
    assert series["instance_count"] == n
    # C-MOVE and C-GET store under the PACS's AE title (as when it sends by itself); WADO-RS under the
    # source's name. Never the node's own AE: the study did not come by the auto-forward.
    expected_calling = "orthanc-web" if method == "wado" else pulled["orthanc"].aet
    assert series["calling_ae"] == expected_calling
    [infer] = _jobs_of(node, info.series_instance_uid, "infer")
    assert infer["status"] == "succeeded"


def test_pulling_again_makes_no_second_job_or_result(pulled) -> None:  # type: ignore[no-untyped-def]
    node: NodeProcess = pulled["node"]
    orthanc: OrthancServer = pulled["orthanc"]
    info: SeriesInfo = pulled["studies"]["move"]
    n = len(info.paths)
    # The study now also holds the node's SEG and SR: those series are skipped, the images are duplicates.
    again = _cli(node, "pull", "--study", info.study_instance_uid, "--from", "orthanc-get")
    assert again.returncode == 0, again.stderr
    assert f"({0} new, {n} already here)" in again.stdout, again.stdout

    # And once more as a `pull` job of the node's worker, through the admin API.
    body = {"source": "orthanc-web", "study_instance_uid": info.study_instance_uid}
    job = node.post_json("/api/pull", body)
    assert job["kind"] == "pull"

    def finished() -> dict[str, Any] | None:
        current: dict[str, Any] = node.get_json(f"/api/jobs/{job['id']}")
        return current if current["status"] in ("succeeded", "dead") else None

    done = wait_for(finished, 60, what="the pull job")
    assert done["status"] == "succeeded", done
    assert done["result"]["retrieved"] == n and done["result"]["duplicates"] == n
    assert done["result"]["skipped_series"] == 2  # the SEG and the SR

    # Past the quiet period and a sweep: still one infer job, one SEG and one SR.
    time.sleep(5)
    assert len(_jobs_of(node, info.series_instance_uid, "infer")) == 1
    assert _results(orthanc, info.study_instance_uid) == {"SEG": 1, "SR": 1}
    assert node.get_json(f"/api/series/{info.series_instance_uid}")["instance_count"] == n


def test_a_queued_pull_is_not_queued_twice(pulled) -> None:  # type: ignore[no-untyped-def]
    node: NodeProcess = pulled["node"]
    info: SeriesInfo = pulled["studies"]["get"]
    first = _cli(node, "pull", "--study", info.study_instance_uid, "--from", "orthanc-get", "--no-wait")
    second = _cli(node, "pull", "--study", info.study_instance_uid, "--from", "orthanc-get", "--no-wait")
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    job_id = first.stdout.split()[2]
    # Either the worker already took the first one (then the second is a new job), or it is returned.
    if "already queued or running" in second.stdout:
        assert second.stdout.split()[2] == job_id


@pytest.mark.parametrize("source", ["orthanc-move", "orthanc-get", "orthanc-web"])
def test_a_study_the_pacs_lacks_is_one_line_and_exit_1(pulled, source: str) -> None:  # type: ignore[no-untyped-def]
    missing = "1.2.826.0.1.3680043.8.498.1"
    out = _cli(pulled["node"], "pull", "--study", missing, "--from", source)
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: {source} has no study {missing}"
    assert out.stdout == ""


def test_find_lists_the_studies_and_queue_pulls_them(pulled) -> None:  # type: ignore[no-untyped-def]
    node: NodeProcess = pulled["node"]
    info: SeriesInfo = pulled["studies"]["wado"]
    for source in ("orthanc-get", "orthanc-web"):
        out = _cli(node, "find", "--from", source, "--modality", "CT")
        assert out.returncode == 0, out.stderr
        assert info.study_instance_uid in out.stdout
        assert "3 studies" in out.stdout
    # The admin API answers the same query without patient data.
    found = node.post_json("/api/sources/orthanc-move/find", {"modality": "CT"})
    assert {m["study_instance_uid"] for m in found} >= {info.study_instance_uid}
    assert all("patient" not in key.lower() for m in found for key in m)
    assert node.get_json("/api/sources")[0]["name"] == "orthanc-move"
