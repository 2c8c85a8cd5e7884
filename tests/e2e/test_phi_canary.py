"""PHI canary: studies whose patient identity is marked with unique strings go through the node's success,
failure and exception paths; the marks appear in no log line, job field, API answer, audit record or
export, metric or database row.

One real node (`dicom-ai-node serve`, SQLite) with a real Orthanc as its PACS (destination with read-back,
and the source it queries and pulls from), and a second destination nothing listens on. The user models
(tests/support/phi.py) read the patient header; two of them fail quoting it. Paths taken:

- a series processed, its SEG + SR delivered to Orthanc and verified; the same series also to a
  destination that is down (deliver retried, then dead);
- a series with a malformed birth date and a single-component name (pydicom and highdicom quote such
  values in their warnings) processed and delivered;
- failures: geometry that cannot be derived (no ImagePositionPatient), corrupt RLE pixel data failing at
  load, a user model raising KeyError with the patient in it, one raising the node's InferenceError
  naming the patient;
- every case of the bad-input corpus refused at C-STORE, marked;
- STOW-RS: a request with good parts and refused parts (202), one with only a refused part (409);
- pull: C-FIND and QIDO-RS queries filtered by the marked patient ID (and one to a source that fails),
  a pull over WADO-RS of a marked study Orthanc holds.
Then everything is read back: the node's log (its stdout and stderr, the inference process's included),
every GET route of the admin API as admin (job lists and details with timelines, series, rules, audit
list and both exports, metrics, OpenAPI, the page), the dry-run and replay answers, and every column of
every table of the database plus its raw file bytes.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE, _config

from dicom_ai_node.devtools.dcmtk import storescu
from dicom_ai_node.devtools.node import TEST_ADMIN, NodeProcess
from dicom_ai_node.devtools.orthanc import OrthancServer, wait_for
from dicom_ai_node.devtools.ports import free_port
from dicom_ai_node.devtools.stack import orthanc_with_node
from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.domain.auth import Role
from dicom_ai_node.errors import InferenceError
from dicom_ai_node.infer.redact import REDACTED, redactor, scrub_exception
from dicom_ai_node.persistence.accounts import AccountRepository
from dicom_ai_node.persistence.db import make_engine
from tests.support.bad_input import CASES, ct_dataset
from tests.support.phi import (
    MALFORMED_BIRTH_DATE,
    MARKS,
    SINGLE_COMPONENT_NAME,
    AdminClient,
    Evidence,
    Finding,
    crawl_api,
    dump_sqlite,
    find_marks,
    mark,
    mark_files,
    write_models,
    write_rules,
)

pytestmark = pytest.mark.e2e

TIMEOUT_S = 150
BOUNDARY = "phi-canary-boundary"
# SeriesDescription -> (model, destinations): what the test's rules do with each marked series.
ROUTES = {
    "PHI OK": ("phi-threshold", ["pacs", "down"]),
    "PHI ODD": ("phi-threshold", ["pacs"]),
    "PHI GEOMETRY": ("phi-threshold", ["pacs"]),
    "PHI CORRUPT": ("phi-threshold", ["pacs"]),
    "PHI RAISES": ("phi-raises", ["pacs"]),
    "PHI REFUSES": ("phi-refuses", ["pacs"]),
}
TERMINAL = ("succeeded", "dead")


@dataclass
class Run:
    """What the node did with the canary studies, and everything it showed afterwards."""

    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # SeriesDescription -> infer job
    deliveries: dict[str, dict[str, Any]] = field(default_factory=dict)  # destination -> deliver job of OK
    pull_job: dict[str, Any] = field(default_factory=dict)
    c_store: dict[str, tuple[int, int]] = field(default_factory=dict)  # case -> (expected, got)
    stow: dict[str, int] = field(default_factory=dict)
    find: dict[str, tuple[int, Any]] = field(default_factory=dict)
    orthanc_patient: dict[str, Any] = field(default_factory=dict)
    study_uids: dict[str, str] = field(default_factory=dict)
    log: Evidence = field(default_factory=Evidence)
    api: Evidence = field(default_factory=Evidence)
    db: Evidence = field(default_factory=Evidence)


def _node_config(work: Path) -> Any:
    def extra(orthanc: OrthancServer) -> dict[str, Any]:
        return {
            "rules_file": str(write_rules(work / "rules.yaml", ROUTES)),
            "models": {"paths": [str(write_models(work / "models"))], "device": "cpu"},
            "destinations": [
                {
                    "name": "pacs",
                    "type": "dicom",
                    "ae_title": orthanc.aet,
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                },
                # Nothing listens there: every attempt is refused, the job goes dead after max_attempts.
                {
                    "name": "down",
                    "type": "dicom",
                    "ae_title": "DOWN",
                    "host": "127.0.0.1",
                    "port": free_port(),
                },
            ],
            "sources": [
                {
                    "name": "orthanc-dimse",
                    "type": "dicom",
                    "ae_title": orthanc.aet,
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                    "retrieve": "get",
                    "timeout_s": 30,
                },
                {"name": "orthanc-web", "type": "dicomweb", "url": orthanc.dicomweb_url, "timeout_s": 30},
                # A QIDO-RS base that answers 404: the query fails (502) with the patient ID as filter.
                {
                    "name": "gone",
                    "type": "dicomweb",
                    "url": f"{orthanc.http_url}/no-such-base",
                    "timeout_s": 10,
                },
            ],
            "worker": {
                "lease_s": 60,
                "heartbeat_s": 5,
                "poll_interval_s": 0.2,
                "max_attempts": 2,
                "backoff_base_s": 0.5,
                "backoff_cap_s": 1,
            },
        }

    return extra


def _tokens(node: NodeProcess) -> tuple[str, str]:
    """(admin token, STOW-RS sender token)."""
    engine = make_engine(node.database_url)
    try:
        accounts = AccountRepository(engine)
        admin, _ = accounts.create_token(TEST_ADMIN, "phi-canary")
        accounts.create_user("modality", Role.SENDER, secrets.token_urlsafe(24))
        sender, _ = accounts.create_token("modality", "ct-scanner-3")
    finally:
        engine.dispose()
    return admin, sender


def _series(work: Path, description: str, n_slices: int = 4, **kwargs: Any) -> list[Path]:
    paths = write_ct_series(work / description.replace(" ", "-").lower(), n_slices=n_slices, rows=32, cols=32)
    return mark_files(paths, description, **kwargs)


def _no_position(ds: Any) -> None:
    del ds.ImagePositionPatient


def _corrupt_rle(ds: Any) -> None:
    """RLE Lossless whose single fragment is garbage (an RLE header declaring 200 segments)."""
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([(200).to_bytes(4, "little") + b"\x00" * 60 + b"garbage" * 20])
    ds["PixelData"].VR = "OB"


def _send(port: int, paths: Sequence[Path], *, chunked: bool = False) -> list[int]:
    """C-STORE each file as it is over one association (calling AE STORESCU); the statuses."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, RLELossless)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = chunked
    statuses = []
    try:
        for path in paths:
            status = assoc.send_c_store(path if chunked else dcmread(path))
            statuses.append(int(status.Status) if status else -1)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    return statuses


def _bad_instances(work: Path) -> dict[str, tuple[Path, int]]:
    """Each case of the bad-input corpus, marked: name -> (file, expected C-STORE status)."""
    out = {}
    for name, (build, status, _reason) in sorted(CASES.items()):
        directory = work / "bad" / name
        directory.mkdir(parents=True)
        out[name] = (build(mark(ct_dataset(directory)), directory / f"{name}.dcm"), status)
    return out


def _multipart(contents: Sequence[bytes]) -> bytes:
    parts = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + c + b"\r\n" for c in contents
    )
    return parts + f"--{BOUNDARY}--\r\n".encode()


def _stow(node: NodeProcess, token: str, contents: Sequence[bytes], run: Run, name: str) -> None:
    r = requests.post(
        f"{node.http_url}/dicom-web/studies",
        data=_multipart(contents),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "Accept": "application/dicom+json",
            "Authorization": f"Bearer {token}",
        },
        timeout=60,
    )
    run.stow[name] = r.status_code
    run.api.add(f"POST /dicom-web/studies {name} ({r.status_code})", r.text)


def _settled(client: AdminClient, expected: int) -> list[dict[str, Any]] | None:
    jobs: list[dict[str, Any]] = client.json("/api/jobs?limit=500")["items"]
    done = len(jobs) >= expected and all(j["status"] in TERMINAL for j in jobs)
    return jobs if done else None


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    work = tmp_path_factory.mktemp("marked")
    result = Run()
    with orthanc_with_node(work, node_extra=_node_config(work)) as (orthanc, node):
        admin_token, sender_token = _tokens(node)
        client = AdminClient(node.http_url, admin_token)

        # Series for the worker's paths, and the corpus refused at C-STORE.
        series = {
            "PHI OK": _series(work, "PHI OK"),
            "PHI ODD": _series(
                work, "PHI ODD", birth_date=MALFORMED_BIRTH_DATE, patient_name=SINGLE_COMPONENT_NAME
            ),
            "PHI GEOMETRY": _series(work, "PHI GEOMETRY", edit=_no_position),
            "PHI CORRUPT": _series(work, "PHI CORRUPT", n_slices=2, edit=_corrupt_rle),
            "PHI RAISES": _series(work, "PHI RAISES", n_slices=2),
            "PHI REFUSES": _series(work, "PHI REFUSES", n_slices=2),
        }
        for description, paths in series.items():
            assert _send(node.dicom_port, paths) == [0] * len(paths), description
            result.study_uids[description] = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        for name, (path, expected) in _bad_instances(work).items():
            [status] = _send(node.dicom_port, [path], chunked=True)
            result.c_store[name] = (expected, status)

        # STOW-RS: good parts with refused ones (a marked invalid UID, text naming the patient), then only
        # a refused part.
        stow = _series(work, "PHI STOW", n_slices=3)
        invalid_uid = CASES["invalid-sop-instance-uid"][0]
        bad_path = invalid_uid(mark(ct_dataset(work / "stow-bad")), work / "stow-bad.dcm")
        not_dicom = f"Patient {MARKS['PatientName']} {MARKS['PatientID']}".encode()
        _stow(
            node,
            sender_token,
            [p.read_bytes() for p in stow] + [bad_path.read_bytes(), not_dicom],
            result,
            "mixed",
        )
        _stow(node, sender_token, [bad_path.read_bytes()], result, "refused")

        # A marked study only Orthanc holds (sent as the node's AE: the auto-forward skips it), to pull.
        pulled = _series(work, "PHI PULLED", n_slices=3)
        storescu(pulled, orthanc.aet, orthanc.dicom_port, node.ae_title)
        result.study_uids["PHI PULLED"] = str(dcmread(pulled[0], stop_before_pixels=True).StudyInstanceUID)
        pull = client.json(
            "/api/pull",
            {"source": "orthanc-web", "study_instance_uid": result.study_uids["PHI PULLED"]},
            "POST",
        )

        # 6 infer jobs, 3 deliveries (OK to pacs and down, ODD to pacs), 1 pull: all finished.
        try:
            jobs = wait_for(lambda: _settled(client, 10), TIMEOUT_S, 0.5, "every job finished")
        except TimeoutError as exc:
            pytest.fail(f"{exc}\nnode log:\n{node.log_tail()}")
        uid_to_description = {
            str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID): d
            for d, paths in series.items()
        }
        for job in jobs:
            if job["kind"] == "infer":
                result.jobs[uid_to_description[job["series_instance_uid"]]] = job
            elif job["kind"] == "deliver" and job["payload"]["series_instance_uid"] in uid_to_description:
                description = uid_to_description[job["payload"]["series_instance_uid"]]
                result.deliveries[f"{description} -> {job['payload']['destination']}"] = job
            elif job["id"] == pull["id"]:
                result.pull_job = job

        # Queries filtered by the marked patient ID, at each source.
        for source in ("orthanc-dimse", "orthanc-web", "gone"):
            body = {"patient_id": MARKS["PatientID"], "limit": 50}
            status, text = client.request(f"/api/sources/{source}/find", body, "POST")
            result.find[source] = (status, text)
            result.api.add(f"POST /api/sources/{source}/find ({status})", text)
        ok_study = orthanc.find_study(result.study_uids["PHI OK"])
        assert ok_study is not None
        result.orthanc_patient = orthanc.get_json(f"/studies/{ok_study}")["PatientMainDicomTags"]

        crawl_api(client, result.api)
        node.stop()  # flushes the log, checkpoints the database
        result.log.add("node.log", node.log_path.read_text(errors="replace"))
        dump_sqlite(Path(node.database_url.removeprefix("sqlite:///")), result.db)
    yield result


def _report(findings: list[Finding]) -> str:
    return "\n".join(str(f) for f in findings[:40]) + (
        f"\n... {len(findings)} in all" if len(findings) > 40 else ""
    )


def test_the_marks_went_through_every_path(run: Run) -> None:
    """The canary is only worth something if the marked studies really took each path."""
    jobs = run.jobs
    assert set(jobs) == set(ROUTES), sorted(jobs)
    assert jobs["PHI OK"]["status"] == "succeeded", jobs["PHI OK"]["last_error"]
    assert jobs["PHI ODD"]["status"] == "succeeded", jobs["PHI ODD"]["last_error"]
    assert run.deliveries["PHI OK -> pacs"]["status"] == "succeeded"
    assert run.deliveries["PHI OK -> pacs"]["result"]["verified"] is True
    assert run.deliveries["PHI ODD -> pacs"]["status"] == "succeeded"
    down = run.deliveries["PHI OK -> down"]
    assert down["status"] == "dead" and down["attempts"] == 2, down
    # Orthanc holds the results under the marked patient: the marks reached the node's outputs.
    assert run.orthanc_patient["PatientName"] == MARKS["PatientName"]
    assert run.orthanc_patient["PatientID"] == MARKS["PatientID"]

    failures = {
        "PHI GEOMETRY": "SeriesGeometryError",
        "PHI CORRUPT": "pixel data could not be decoded",
        "PHI RAISES": "KeyError",
        "PHI REFUSES": "no atlas fits patient",
    }
    for description, reason in failures.items():
        job = jobs[description]
        assert job["status"] == "dead" and reason in (job["last_error"] or ""), (description, job)

    assert {name: got for name, (_, got) in run.c_store.items()} == {
        name: expected for name, (expected, _) in run.c_store.items()
    }
    assert run.stow == {"mixed": 202, "refused": 409}
    assert run.find["gone"][0] == 502
    for source in ("orthanc-dimse", "orthanc-web"):
        status, text = run.find[source]
        assert status == 200 and run.study_uids["PHI OK"] in text, (source, status, text)
    assert run.pull_job["status"] == "succeeded", run.pull_job
    assert run.pull_job["result"]["retrieved"] == 3


def test_the_search_finds_the_marks_where_they_are(tmp_path: Path) -> None:
    """The searcher itself: it finds every mark in a marked file, in any case and with ^ as space."""
    [path] = write_ct_series(tmp_path, n_slices=1, rows=8, cols=8)
    ds = mark(dcmread(path))
    found = {f.mark for f in find_marks("file", str(ds))}
    assert {"CANARY^NAME7Q3", "CANARYID7Q3", "19170923", "CANARYOTHER7Q3", "CANARYREF^DOC7Q3"} <= found
    assert find_marks("x", "canary name7q3") and find_marks("x", "born 1917-09-23")
    assert not find_marks("x", "1.2.826.0.1.3680043.8.498.19170923111")  # inside a UID: not a date


def test_no_mark_in_the_log(run: Run) -> None:
    assert len(run.log.texts["node.log"]) > 1000
    findings = run.log.findings()
    assert not findings, "PHI in the node's log:\n" + _report(findings)


def test_no_mark_in_any_api_answer_audit_export_or_metric(run: Run) -> None:
    places = list(run.api.texts)
    assert any(p.startswith("GET /metrics (200)") for p in places)
    assert any(p.startswith("GET /api/audit/export?format=csv (200)") for p in places)
    assert sum(p.startswith("GET /api/jobs/") for p in places) >= 10
    findings = run.api.findings()
    assert not findings, "PHI in API answers:\n" + _report(findings)


def test_no_mark_in_the_database(run: Run) -> None:
    assert any(p.startswith("db jobs.last_error") for p in run.db.texts)
    assert any(p.startswith("db audit_events.detail") for p in run.db.texts)
    findings = run.db.findings()
    assert not findings, "PHI in the database:\n" + _report(findings)


def test_scrubbing_keeps_the_reason_and_cuts_only_whole_values(tmp_path: Path) -> None:
    """What the worker does to a model's error, without a node: every chained exception loses the header's
    patient values (as text or inside a printed object), the rest of the message stays."""
    [path] = write_ct_series(tmp_path, n_slices=1, rows=8, cols=8)
    ds = mark(dcmread(path, stop_before_pixels=True))
    ds.OperatorsName = "Li"
    try:
        try:
            raise KeyError((ds.PatientName, ds.PatientID))
        except KeyError as inner:
            raise InferenceError(f"model failed for canary name7q3, born 1917-09-23: {inner}") from inner
    except InferenceError as exc:
        scrub_exception(exc, ds)
        outer, cause = str(exc), str(exc.__cause__)
    assert not find_marks("error", outer + cause), outer + cause
    assert outer.startswith("model failed for ") and REDACTED in outer and REDACTED in cause
    # "Li" is a value too, but only where it stands alone.
    assert redactor(ds)("failed: Li, lines") == f"failed: {REDACTED}, lines"
    assert redactor(None)("unchanged") == "unchanged"
