"""The streaming multipart/related splitter and the STOW-RS response rendering (api/multipart.py,
api/dicomweb.py): boundaries split across chunks, preamble/epilogue, quoted boundaries, truncation."""

from __future__ import annotations

from xml.etree import ElementTree as ET

import pytest

from dicom_ai_node.api.dicomweb import store_response, to_xml, wants_xml
from dicom_ai_node.api.multipart import (
    MultipartError,
    MultipartSplitter,
    PartData,
    PartEnd,
    PartStart,
    check_boundary,
    parse_media_type,
)
from dicom_ai_node.domain.ingest import IngestResult, calling_label

BOUNDARY = b"xYz-123"


def body(
    *parts: tuple[dict[str, str], bytes], preamble: bytes = b"", epilogue: bytes = b"", close: bool = True
) -> bytes:
    out = preamble
    for headers, content in parts:
        out += b"--" + BOUNDARY + b"\r\n"
        out += b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"
        out += content + b"\r\n"
    if close:
        out += b"--" + BOUNDARY + b"--" + epilogue
    return out


def split(data: bytes, chunk: int, boundary: bytes = BOUNDARY) -> list[tuple[dict[str, str], bytes]]:
    splitter = MultipartSplitter(boundary)
    parts: list[tuple[dict[str, str], bytes]] = []
    content = b""
    for i in range(0, len(data), chunk):
        for event in splitter.feed(data[i : i + chunk]):
            if isinstance(event, PartStart):
                parts.append((event.headers, b""))
                content = b""
            elif isinstance(event, PartData):
                content += event.data
            elif isinstance(event, PartEnd):
                parts[-1] = (parts[-1][0], content)
    splitter.close()
    return parts


# Contents that look like delimiters without being one: CRLF, dashes, the boundary without its "--".
TRICKY = b"\r\n--xYz-12\r\n-" + BOUNDARY + b"\r\n\r\n--"
DICOM_HEADERS = {"Content-Type": "application/dicom"}


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 11, 64, 10_000])
def test_parts_come_out_whole_whatever_the_chunking(chunk: int) -> None:
    parts = [(DICOM_HEADERS, b"first" * 100), ({"Content-Type": "application/dicom"}, TRICKY), ({}, b"")]
    data = body(*parts, preamble=b"this is a preamble\r\n", epilogue=b"\r\nan epilogue --xYz-123\r\n")
    got = split(data, chunk)
    assert [c for _, c in got] == [b"first" * 100, TRICKY, b""]
    assert got[0][0] == {"content-type": "application/dicom"}
    assert got[2][0] == {}  # a part without headers


def test_the_first_delimiter_may_open_the_body_and_padding_is_allowed() -> None:
    data = b"--" + BOUNDARY + b"  \t\r\nContent-Type: application/dicom\r\n\r\nabc\r\n--" + BOUNDARY + b"--"
    assert split(data, 5) == [({"content-type": "application/dicom"}, b"abc")]


def test_a_body_without_its_closing_boundary_is_refused() -> None:
    truncated = body((DICOM_HEADERS, b"x" * 1000), close=False)
    with pytest.raises(MultipartError, match="without its closing boundary"):
        split(truncated, 100)
    with pytest.raises(MultipartError, match="before the first part"):
        split(b"no multipart here at all", 4)
    # Cut inside the close delimiter itself.
    with pytest.raises(MultipartError):
        split(body((DICOM_HEADERS, b"x"))[:-1], 3)


def test_malformed_headers_and_delimiter_lines_are_refused() -> None:
    with pytest.raises(MultipartError, match="part header"):
        split(b"--" + BOUNDARY + b"\r\nno colon here\r\n\r\nx\r\n--" + BOUNDARY + b"--", 8)
    with pytest.raises(MultipartError, match="delimiter line"):
        split(b"--" + BOUNDARY + b"garbage\r\n\r\nx\r\n--" + BOUNDARY + b"--", 8)
    with pytest.raises(MultipartError, match="too long"):
        split(b"--" + BOUNDARY + b"\r\nX: " + b"a" * 20_000 + b"\r\n\r\nx\r\n--" + BOUNDARY + b"--", 1000)


def test_media_type_parameters_quoted_or_not() -> None:
    media, params = parse_media_type('Multipart/Related; Type="application/dicom"; boundary="a b:c\\"d"')
    assert media == "multipart/related"
    assert params == {"type": "application/dicom", "boundary": 'a b:c"d'}
    assert parse_media_type("multipart/related;boundary=abc;type=application/dicom") == (
        "multipart/related",
        {"boundary": "abc", "type": "application/dicom"},
    )
    assert parse_media_type("") == ("", {})
    assert check_boundary("a b:c") == b"a b:c"
    for bad in ("", "x" * 71, "trailing ", "semi;colon"):
        with pytest.raises(MultipartError):
            check_boundary(bad)


def test_quoted_boundary_with_spaces_splits() -> None:
    boundary = b"a quoted boundary"
    data = b"--" + boundary + b"\r\n\r\npayload\r\n--" + boundary + b"--\r\n"
    assert split(data, 3, boundary) == [({}, b"payload")]


def _results() -> list[IngestResult]:
    return [
        IngestResult(0, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.1", "stored", stored=True),
        IngestResult(
            0, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.2", "already stored", stored=True, duplicate=True
        ),
        IngestResult(0xA900, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.3", "other study", stored=False),
        IngestResult(0xC000, "", "", "not DICOM", stored=False),
    ]


def test_store_response_json_lists_stored_and_failed_instances() -> None:
    js = store_response(_results()).to_json_dict()
    referenced = js["00081199"]["Value"]
    assert [i["00081155"]["Value"] for i in referenced] == [["1.2.3.1"], ["1.2.3.2"]]
    failed = js["00081198"]["Value"]
    assert [(i["00081197"]["vr"], i["00081197"]["Value"]) for i in failed] == [
        ("US", [0xA900]),
        ("US", [0xC000]),
    ]
    assert "00081190" not in js  # no WADO-RS on the node, so no RetrieveURL
    assert "00081198" not in store_response(_results()[:2]).to_json_dict()


def test_store_response_xml_is_the_native_dicom_model() -> None:
    root = ET.fromstring(to_xml(store_response(_results())))
    ns = {"n": "http://dicom.nema.org/PS3.19/models/NativeDICOM"}
    assert root.tag == "{http://dicom.nema.org/PS3.19/models/NativeDICOM}NativeDicomModel"
    failed = root.find("n:DicomAttribute[@tag='00081198']", ns)
    assert failed is not None and failed.get("keyword") == "FailedSOPSequence"
    reasons = [
        v.text for v in failed.findall("n:Item/n:DicomAttribute[@keyword='FailureReason']/n:Value", ns)
    ]
    assert reasons == [str(0xA900), str(0xC000)]
    uids = root.findall(
        "n:DicomAttribute[@tag='00081199']/n:Item/n:DicomAttribute[@tag='00081155']/n:Value", ns
    )
    assert [u.text for u in uids] == ["1.2.3.1", "1.2.3.2"]


def test_accept_picks_xml_only_when_asked() -> None:
    assert not wants_xml(None) and not wants_xml("*/*") and not wants_xml("application/dicom+json")
    assert wants_xml("application/dicom+xml")
    assert wants_xml("application/dicom+xml, application/dicom+json")
    assert not wants_xml("application/dicom+json, application/dicom+xml;q=0.5")


def test_calling_label_is_an_ae_like_title() -> None:
    assert calling_label("ct-scanner-1") == "ct-scanner-1"
    assert calling_label("a name that is much longer than sixteen") == "a name that is m"
    assert calling_label("back\\slash\u00e9") == "back_slash_"
    assert calling_label("   ") == "STOW"
