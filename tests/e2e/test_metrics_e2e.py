"""/metrics of a running node (`dicom-ai-node serve`) moves when a study goes through it, against a real Orthanc.

storescu -> Orthanc -> (Lua auto-forward) -> node -> SEG + SR -> Orthanc; /metrics is read from loopback
(open to 127.0.0.0/8 by default, no sign-in) before and after.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicom_ai_node.devtools.datasets import lung_ct_series
from dicom_ai_node.devtools.dcmtk import storescu
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.stack import orthanc_with_node

pytestmark = pytest.mark.e2e

TIMEOUT_S = 300
CT_MODEL = "ct-lung"  # what the default rules run on chest CT

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(node: NodeProcess) -> Samples:
    with urllib.request.urlopen(f"{node.http_url}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_move_when_a_study_goes_through(tmp_path: Path) -> None:
    with orthanc_with_node(tmp_path) as (orthanc, node):
        before = _scrape(node)
        ct = lung_ct_series(tmp_path / "ct", "lung1")
        storescu(list(ct.paths), orthanc.aet, orthanc.dicom_port)

        # The deliver job is counted when the worker commits it, a moment after Orthanc holds the results.
        deadline = time.monotonic() + TIMEOUT_S
        after = before
        while time.monotonic() < deadline:
            after = _scrape(node)
            if _get(after, "ainode_jobs_finished_total", kind="deliver", status="succeeded") > _get(
                before, "ainode_jobs_finished_total", kind="deliver", status="succeeded"
            ):
                break
            time.sleep(1)
        else:
            pytest.fail(f"no deliver job succeeded within {TIMEOUT_S} s\nnode log:\n{node.log_tail()}")

    def grew(name: str, **labels: str) -> float:
        return _get(after, name, **labels) - _get(before, name, **labels)

    n = len(ct.paths)
    assert grew("ainode_instances_received_total") == n
    assert grew("ainode_cstore_responses_total", status="0x0000") == n
    assert grew("ainode_received_bytes_total") > 0
    for stage in ("load", "infer", "encode"):
        assert grew("ainode_stage_duration_seconds_count", stage=stage, model=CT_MODEL) == 1
    assert grew("ainode_delivery_duration_seconds_count", destination="pacs") >= 1
    assert grew("ainode_receive_to_delivered_seconds_count") >= 1
    assert grew("ainode_jobs_finished_total", kind="infer", status="succeeded") == 1
    assert grew("ainode_jobs_finished_total", kind="deliver", status="succeeded") >= 1
    assert _get(after, "ainode_jobs", kind="deliver", status="succeeded") >= 1
    assert ("ainode_queue_depth", frozenset({("kind", "infer")})) in after
    # No UID (source or result) in any label.
    uids = {ct.study_instance_uid, ct.series_instance_uid, *ct.sop_instance_uids}
    assert not [key for key in after if any(value in uids for _, value in key[1])]
