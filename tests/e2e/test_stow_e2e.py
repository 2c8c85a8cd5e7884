"""STOW-RS into the node against a real Orthanc: a series sent by STOW-RS (no DIMSE in) is stored, routed,
segmented, and its SEG + SR land in Orthanc; bad requests get a 4xx with a reason and store nothing.

Real data: the ch2 T1 brain MR (Debian mricron-data), written with fresh UIDs; the node is its own process
(`dicom-ai-node serve`) on SQLite, sending results to Orthanc over DIMSE.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom import dcmread

from dicom_ai_node.devtools.datasets import ch2_mr_series
from dicom_ai_node.devtools.node import NodeProcess
from dicom_ai_node.devtools.orthanc import OrthancServer
from dicom_ai_node.devtools.stack import orthanc_with_node
from dicom_ai_node.devtools.synthetic import write_mr_series
from dicom_ai_node.domain.auth import Role
from dicom_ai_node.persistence.accounts import AccountRepository
from dicom_ai_node.persistence.db import make_engine

pytestmark = pytest.mark.e2e

TIMEOUT_S = 300
BOUNDARY = "e2e-stow-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
MAX_REQUEST_MB = 24  # above the ch2 MR series (~14 MB), below what the oversize case sends
TOKEN_NAME = "mr-scanner-7"


@dataclass
class Stack:
    orthanc: OrthancServer
    node: NodeProcess
    work: Path
    token: str

    @property
    def url(self) -> str:
        return f"{self.node.http_url}/dicom-web/studies"

    def post(
        self, body: Any, *, content_type: str = CONTENT_TYPE, token: str | None = "", path: str = ""
    ) -> Any:
        headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token or self.token}"
        return requests.post(self.url + path, data=body, headers=headers, timeout=120)


def _sender_token(database_url: str) -> str:
    engine = make_engine(database_url)
    try:
        accounts = AccountRepository(engine)
        accounts.create_user("modality", Role.SENDER, secrets.token_urlsafe(24))
        secret, _ = accounts.create_token("modality", TOKEN_NAME)
    finally:
        engine.dispose()
    return secret


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("stow-e2e")
    limits = {"dicomweb": {"stow_max_request_mb": MAX_REQUEST_MB, "stow_max_part_mb": 4}}
    with orthanc_with_node(work, node_extra=lambda _: limits) as (orthanc, node):
        yield Stack(orthanc, node, work, _sender_token(node.database_url))


def multipart(contents: Sequence[bytes], *, close: bool = True) -> bytes:
    out = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + c + b"\r\n" for c in contents
    )
    return out + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def _uids(paths: Sequence[Path]) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_a_series_sent_by_stow_rs_comes_back_as_seg_and_sr_in_orthanc(stack: Stack) -> None:
    mr = ch2_mr_series(stack.work / "mr")
    r = stack.post(multipart([p.read_bytes() for p in mr.paths]))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    listed = {i["00081155"]["Value"][0] for i in r.json()["00081199"]["Value"]}
    assert listed == _uids(mr.paths) and "00081198" not in r.json()
    # Stored before the answer: the node lists the series at once, with the token's name as calling AE.
    [row] = [
        s
        for s in stack.node.get_json("/api/series?limit=100")["items"]
        if s["series_instance_uid"] == mr.series_instance_uid
    ]
    assert row["instance_count"] == len(mr.paths) and row["calling_ae"] == TOKEN_NAME

    def results() -> tuple[Any, Any] | None:
        seg = stack.orthanc.series_by_modality(mr.study_instance_uid, "SEG")
        sr = stack.orthanc.series_by_modality(mr.study_instance_uid, "SR")
        return (seg, sr) if seg and sr else None

    try:
        seg, sr = stack.orthanc.wait_for(results, TIMEOUT_S, 1.0, "SEG + SR of the STOW-RS series")
    except TimeoutError as exc:
        pytest.fail(f"{exc}\nnode log:\n{stack.node.log_tail()}")
    assert len(seg) == 1 and len(sr) == 1
    [job] = [j for j in stack.node.jobs(kind="infer") if j["series_instance_uid"] == mr.series_instance_uid]
    assert job["model"] == "mr-brain"
    # The same STOW again: still 200, stored once.
    again = stack.post(multipart([p.read_bytes() for p in mr.paths[:3]]))
    assert again.status_code == 200 and len(again.json()["00081199"]["Value"]) == 3


def _node_has_series(stack: Stack, series_uid: str) -> bool:
    items = stack.node.get_json("/api/series?limit=500")["items"]
    return any(s["series_instance_uid"] == series_uid for s in items)


def test_bad_requests_get_a_4xx_with_a_reason_and_store_nothing(stack: Stack) -> None:
    files = write_mr_series(stack.work / "bad", n_slices=4, rows=32, cols=32)
    first = dcmread(files[0], stop_before_pixels=True)
    good = [p.read_bytes() for p in files]
    full = multipart(good)
    cases: list[tuple[str, Any, int, str]] = [
        ("no token", stack.post(full, token=None), 401, "API token"),
        ("wrong token", stack.post(full, token="ainode_wrong"), 401, "token"),
        ("wrong content type", stack.post(full, content_type="application/dicom"), 415, "multipart/related"),
        (
            "no type parameter",
            stack.post(full, content_type=f"multipart/related; boundary={BOUNDARY}"),
            415,
            "type",
        ),
        ("truncated", stack.post(full[: len(full) - 200]), 400, "closing boundary"),
        ("no closing boundary", stack.post(multipart(good, close=False)), 400, "closing boundary"),
        ("oversize part", stack.post(multipart([*good, b"\0" * (5 * 2**20)])), 413, "stow_max_part_mb"),
    ]
    for name, r, status, reason in cases:
        assert r.status_code == status, (name, r.status_code, r.text)
        assert reason in r.json()["detail"], (name, r.json())
    # Declared length over the limit: refused before the body is read.
    big = multipart([*good, *[b"\0" * (3 * 2**20)] * 9])
    assert len(big) > MAX_REQUEST_MB * 2**20
    r = stack.post(big)
    assert r.status_code == 413 and "stow_max_request_mb" in r.json()["detail"], r.text
    # A part that is not DICOM fails alone; when it is the only part, nothing is stored: 409.
    only_bad = stack.post(multipart([b"this is not a DICOM file"]))
    assert only_bad.status_code == 409
    assert [i["00081197"]["Value"][0] for i in only_bad.json()["00081198"]["Value"]] == [0xC000]
    time.sleep(1)
    assert not _node_has_series(stack, str(first.SeriesInstanceUID))
    assert stack.orthanc.find_study(str(first.StudyInstanceUID)) is None
    spool_incoming = stack.node.workdir / "spool" / "incoming"
    assert [p.name for p in spool_incoming.iterdir() if p.name.startswith("stow-")] == []
    # The audit trail has each refusal (no PHI: counts and reasons only).
    events = stack.node.get_json("/api/audit?action=stow.store&limit=50")
    assert sum(1 for e in events if e["outcome"] == "failed") >= 7
