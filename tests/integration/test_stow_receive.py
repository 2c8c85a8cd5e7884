"""STOW-RS receive (api/routers/stow.py) through the admin app with the real ingest path: a SQLite
database, a spool on disk, multipart bodies as senders build them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import UID

from dicom_ai_node.devtools.synthetic import write_ct_series
from dicom_ai_node.domain.auth import Role
from dicom_ai_node.domain.ingest import StowLimits
from dicom_ai_node.receive.ingest import stow_ingest
from dicom_ai_node.store.spool import Spool
from tests.support.admin_api import PASSWORD, ApiEnv, make_api
from tests.support.bad_input import CASES as BAD_INPUT_CASES
from tests.support.bad_input import bad_instance

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
BOUNDARY = "stow-test-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


@dataclass
class Stow:
    env: ApiEnv
    spool: Spool

    def headers(self, user: str = "sender", content_type: str = CONTENT_TYPE, **extra: str) -> dict[str, str]:
        secret, _ = self.env.ctx.accounts.create_token(user, f"{user}-device")
        return {"Authorization": f"Bearer {secret}", "Content-Type": content_type, **extra}

    def post(self, data: Any, path: str = "/dicom-web/studies", **headers: Any) -> Any:
        return self.env.client().post(path, content=data, headers=self.headers(**headers))

    def spooled(self) -> list[Path]:
        return sorted((self.spool.root / "instances").rglob("*.dcm"))

    def incoming(self) -> list[Path]:
        return sorted(self.spool.incoming.iterdir())


@pytest.fixture
def stow(tmp_path: Path) -> Stow:
    env = make_api(tmp_path)
    spool = Spool(tmp_path / "spool")
    env.ctx.ingest = stow_ingest(spool, env.ctx.repo, reserve_bytes=0)
    env.ctx.incoming_dir = spool.incoming
    return Stow(env, spool)


def multipart(parts: Sequence[bytes | tuple[str | None, bytes]], *, close: bool = True) -> bytes:
    out = b""
    for part in parts:
        content_type, content = part if isinstance(part, tuple) else ("application/dicom", part)
        out += f"--{BOUNDARY}\r\n".encode()
        if content_type is not None:
            out += f"Content-Type: {content_type}\r\n".encode()
        out += b"\r\n" + content + b"\r\n"
    return out + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    return write_ct_series(tmp_path / "ct", n_slices=3, rows=32, cols=32)


def _uids(files: Sequence[Path]) -> list[str]:
    return [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]


def _referenced(r: Any) -> list[str]:
    return [i["00081155"]["Value"][0] for i in r.json().get("00081199", {}).get("Value", [])]


def _failed(r: Any) -> list[tuple[str, int]]:
    items = r.json().get("00081198", {}).get("Value", [])
    return [(i["00081155"].get("Value", [""])[0], i["00081197"]["Value"][0]) for i in items]


def test_a_series_is_stored_and_every_sop_listed(stow: Stow, series: list[Path]) -> None:
    r = stow.post(multipart([f.read_bytes() for f in series]))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    assert sorted(_referenced(r)) == sorted(_uids(series)) and "00081198" not in r.json()
    first = dcmread(series[0], stop_before_pixels=True)
    row = stow.env.ctx.repo.get_series(str(first.SeriesInstanceUID))
    assert row is not None and row.instance_count == 3 and row.modality == "CT"
    # Rules can match STOW-RS senders on CallingAETitle: the token's name.
    assert row.calling_ae == "sender-device"
    assert len(stow.spooled()) == 3 and stow.incoming() == []
    [event] = stow.env.ctx.audit.list_events(action="stow.store")
    assert (event.actor, event.target, event.outcome) == ("sender", str(first.StudyInstanceUID), "ok")
    assert event.detail["stored"] == 3 and event.detail["failed"] == 0 and event.detail["duplicates"] == 0
    # The same shape as a received association's dicom.instances_transferred event.
    assert (event.detail["role"], event.detail["via"], event.detail["instances"]) == (
        "destination",
        "STOW-RS",
        3,
    )
    assert event.detail["studies"] == [str(first.StudyInstanceUID)]
    assert event.detail["statuses"] == {"0x0000": 3}


def test_a_repeated_stow_is_stored_once_and_still_200(stow: Stow, series: list[Path]) -> None:
    body = multipart([f.read_bytes() for f in series])
    assert stow.post(body).status_code == 200
    again = stow.post(body)
    assert again.status_code == 200 and sorted(_referenced(again)) == sorted(_uids(series))
    row = stow.env.ctx.repo.get_series(str(dcmread(series[0]).SeriesInstanceUID))
    assert row is not None and row.instance_count == 3 and len(stow.spooled()) == 3
    assert stow.env.ctx.audit.list_events(action="stow.store")[0].detail["duplicates"] == 3


def test_parts_that_are_not_dicom_fail_alone(stow: Stow, series: list[Path]) -> None:
    r = stow.post(
        multipart([series[0].read_bytes(), b"not a DICOM file", ("text/plain", series[1].read_bytes())])
    )
    assert r.status_code == 202, r.text
    assert _referenced(r) == _uids(series[:1])
    assert _failed(r) == [("", 0xC000), ("", 0xC000)]
    assert len(stow.spooled()) == 1 and stow.incoming() == []
    only_bad = stow.post(multipart([b"\x00" * 500]))
    assert only_bad.status_code == 409 and _failed(only_bad) == [("", 0xC000)]
    # A part without headers is application/dicom (RFC 2387: the `type` parameter).
    untyped = stow.post(multipart([(None, series[2].read_bytes())]))
    assert untyped.status_code == 200 and _referenced(untyped) == _uids(series[2:])


def test_instances_of_another_study_fail_with_a900(stow: Stow, series: list[Path], tmp_path: Path) -> None:
    study = str(dcmread(series[0]).StudyInstanceUID)
    other = write_ct_series(tmp_path / "other", n_slices=1, rows=32, cols=32)
    r = stow.post(
        multipart([f.read_bytes() for f in [*series[:2], *other]]), path=f"/dicom-web/studies/{study}"
    )
    assert r.status_code == 202, r.text
    assert sorted(_referenced(r)) == sorted(_uids(series[:2]))
    assert _failed(r) == [(_uids(other)[0], 0xA900)]
    none = stow.post(multipart([other[0].read_bytes()]), path=f"/dicom-web/studies/{study}")
    assert none.status_code == 409 and _failed(none) == [(_uids(other)[0], 0xA900)]
    assert len(stow.spooled()) == 2


def test_a_sop_class_the_node_does_not_accept_fails_with_0122(stow: Stow, tmp_path: Path) -> None:
    [path] = write_ct_series(tmp_path / "sr", n_slices=1, rows=32, cols=32)
    ds = dcmread(path)
    basic_text_sr = UID("1.2.840.10008.5.1.4.1.1.88.11")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = basic_text_sr
    ds.save_as(path)
    r = stow.post(multipart([path.read_bytes()]))
    assert r.status_code == 409 and _failed(r) == [(str(ds.SOPInstanceUID), 0x0122)]


def test_xml_when_the_client_asks(stow: Stow, series: list[Path]) -> None:
    r = stow.post(multipart([series[0].read_bytes()]), Accept="application/dicom+xml")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+xml"
    assert b"NativeDicomModel" in r.content and _uids(series[:1])[0].encode() in r.content


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        "application/json",
        f"multipart/related; boundary={BOUNDARY}",  # no type parameter
        f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
        f'multipart/form-data; type="application/dicom"; boundary={BOUNDARY}',
        'multipart/related; type="application/dicom"',  # no boundary
    ],
)
def test_a_wrong_content_type_is_415_and_stores_nothing(
    stow: Stow, series: list[Path], content_type: str
) -> None:
    r = stow.post(multipart([series[0].read_bytes()]), content_type=content_type)
    assert r.status_code == 415 and r.json()["detail"], r.text
    assert stow.spooled() == [] and stow.incoming() == []


def test_the_content_type_is_case_insensitive_and_may_quote_the_boundary(
    stow: Stow, series: list[Path]
) -> None:
    content_type = f'Multipart/Related; TYPE="Application/DICOM"; boundary="{BOUNDARY}"'
    assert stow.post(multipart([series[0].read_bytes()]), content_type=content_type).status_code == 200


def test_a_truncated_body_is_400_and_stores_nothing(stow: Stow, series: list[Path]) -> None:
    before = stow.env.ctx.repo.count_series()
    full = multipart([f.read_bytes() for f in series])
    for body in (
        multipart([f.read_bytes() for f in series], close=False),
        full[: len(full) // 2],
        b"garbage",
    ):
        r = stow.post(body)
        assert r.status_code == 400 and "closing boundary" in r.json()["detail"], r.text
    assert stow.spooled() == [] and stow.incoming() == []
    assert stow.env.ctx.repo.count_series() == before
    events = stow.env.ctx.audit.list_events(action="stow.store")
    assert len(events) == 3 and {e.outcome for e in events} == {"failed"}
    assert {e.detail["status"] for e in events} == {400}


def _chunks(data: bytes, size: int = 4096) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_oversize_requests_and_parts_are_413_and_store_nothing(stow: Stow, series: list[Path]) -> None:
    part = series[0].read_bytes()
    body = multipart([f.read_bytes() for f in series])
    stow.env.ctx.stow_limits = StowLimits(max_request_bytes=len(body) - 1, max_part_bytes=len(part) + 100)
    declared = stow.post(body)  # Content-Length over the limit: refused before reading
    assert declared.status_code == 413 and "stow_max_request_mb" in declared.json()["detail"]
    streamed = stow.post(_chunks(body))  # chunked, no Content-Length: refused when the stream passes it
    assert streamed.status_code == 413 and "stow_max_request_mb" in streamed.json()["detail"]
    stow.env.ctx.stow_limits = StowLimits(max_request_bytes=10 * len(body), max_part_bytes=len(part) - 1)
    one_part = stow.post(_chunks(body))
    assert one_part.status_code == 413 and "stow_max_part_mb" in one_part.json()["detail"]
    assert stow.spooled() == [] and stow.incoming() == []
    assert stow.env.ctx.repo.count_series() == 1  # make_api's own series only


def test_a_streamed_body_in_small_chunks_is_stored(stow: Stow, series: list[Path]) -> None:
    r = stow.post(_chunks(multipart([f.read_bytes() for f in series]), 977))
    assert r.status_code == 200 and sorted(_referenced(r)) == sorted(_uids(series))


def test_stow_needs_a_token_whose_role_may_store(stow: Stow, series: list[Path]) -> None:
    body = multipart([series[0].read_bytes()])
    client = stow.env.client()
    assert (
        client.post("/dicom-web/studies", content=body, headers={"Content-Type": CONTENT_TYPE}).status_code
        == 401
    )
    bad = {"Content-Type": CONTENT_TYPE, "Authorization": "Bearer ainode_nope"}
    assert client.post("/dicom-web/studies", content=body, headers=bad).status_code == 401
    # A signed-in page session is not a STOW-RS credential, CSRF token or not.
    page = stow.env.client()
    csrf = stow.env.sign_in(page, "admin")
    r = page.post(
        "/dicom-web/studies", content=body, headers={"Content-Type": CONTENT_TYPE, "X-CSRF-Token": csrf}
    )
    assert r.status_code == 401
    viewer = stow.post(body, user="viewer")
    assert viewer.status_code == 403 and viewer.json() == {"detail": "needs role sender, operator or admin"}
    assert stow.spooled() == []
    for user in ("operator", "admin", "sender"):
        assert stow.post(body, user=user).status_code == 200, user
    # An admin's token limited to viewer may not store either (effective role = the lower one).
    secret, _ = stow.env.ctx.accounts.create_token("admin", "read-only", Role.VIEWER)
    limited = {"Content-Type": CONTENT_TYPE, "Authorization": f"Bearer {secret}"}
    assert client.post("/dicom-web/studies", content=body, headers=limited).status_code == 403


def test_a_sender_reads_nothing(stow: Stow) -> None:
    headers = stow.headers("sender")
    client = stow.env.client()
    for path in ("/api/jobs", "/api/series", "/api/rules", "/api/destinations", "/api/models"):
        assert client.get(path, headers=headers).status_code == 403, path
    page = stow.env.client()
    r = page.post("/api/auth/login", json={"username": "sender", "password": PASSWORD})
    assert r.status_code == 403  # no page session at all: it would only meet 403s
    assert page.get("/api/jobs").status_code == 401


def test_stow_off_is_404(stow: Stow, series: list[Path]) -> None:
    stow.env.ctx.ingest = None
    r = stow.post(multipart([series[0].read_bytes()]))
    assert r.status_code == 404 and "stow_enabled" in r.json()["detail"]


def test_tokens_and_users_take_the_sender_role(stow: Stow) -> None:
    admin = stow.env.client(headers=stow.env.token("admin"))
    r = admin.post(
        "/api/users",
        json={"username": f"modality-{uuid.uuid4().hex[:6]}", "role": "sender", "password": PASSWORD},
    )
    assert r.status_code == 201 and r.json()["role"] == "sender"
    t = admin.post("/api/tokens", json={"username": "operator", "name": "ct-scanner", "role": "sender"})
    assert t.status_code == 201 and t.json()["token"]["role"] == "sender"
    # A sender's token cannot be raised above sender.
    up = admin.post("/api/tokens", json={"username": "sender", "name": "x", "role": "viewer"})
    assert up.status_code == 400


@pytest.mark.parametrize("name", sorted(BAD_INPUT_CASES))
def test_bad_input_gets_its_failure_reason_and_nothing_is_kept(stow: Stow, name: str, tmp_path: Path) -> None:
    """The receive checks of C-STORE (tests/integration/test_scp_bad_input.py), with PS3.18's codes; the
    part's File Meta Information stands for the C-STORE request."""
    bad = bad_instance(name, tmp_path / "corpus")
    before = stow.env.ctx.repo.count_series()
    r = stow.post(multipart([bad.path.read_bytes()]))
    assert r.status_code == 409, r.text
    [(_, reason)] = _failed(r)
    assert reason == bad.stow_failure_reason, f"{name}: 0x{reason:04X}"
    assert stow.spooled() == [] and stow.incoming() == []
    assert stow.env.ctx.repo.get_series(bad.series_instance_uid) is None
    assert stow.env.ctx.repo.count_series() == before
