"""Query a PACS source: Study Root C-FIND (STUDY / SERIES level, PS3.4 C.6.2) or QIDO-RS (PS3.18 10.6).

C-FIND and QIDO-RS answers carry patient name and ID. They are read into `StudyMatch.patient_*` only when
the caller asks (`with_patient=True`: the `find` CLI table for the operator on the server), and are never
logged, stored, audited or put into a job or an API response; `StudyMatch.info` is the PHI-free part.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import requests
from pydicom import Dataset
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from dicom_ai_node.domain.catalog import StudyMatchInfo, StudyQuery
from dicom_ai_node.domain.peers import Source
from dicom_ai_node.errors import PermanentPullError, StudyNotFoundError, TransientPullError
from dicom_ai_node.pull._dimse import PENDING, QrPeer, associate, check_final, qr_peer
from dicom_ai_node.pull.web import dicomweb_client

log = logging.getLogger(__name__)

STUDY_ROOT_FIND = StudyRootQueryRetrieveInformationModelFind

# DICOM JSON tags (PS3.18 F.2) read from QIDO-RS answers.
_TAGS = {
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "StudyDate": "00080020",
    "StudyDescription": "00081030",
    "AccessionNumber": "00080050",
    "ModalitiesInStudy": "00080061",
    "Modality": "00080060",
    "SeriesDescription": "0008103E",
    "NumberOfStudyRelatedSeries": "00201206",
    "NumberOfStudyRelatedInstances": "00201208",
    "NumberOfSeriesRelatedInstances": "00201209",
    "PatientName": "00100010",
    "PatientID": "00100020",
}


@dataclass(frozen=True)
class StudyMatch:
    """A study found at a source. `patient_name`/`patient_id` are empty unless asked for (CLI only)."""

    info: StudyMatchInfo
    patient_name: str = field(default="", repr=False)
    patient_id: str = field(default="", repr=False)


@dataclass(frozen=True)
class SeriesMatch:
    series_instance_uid: str
    modality: str = ""
    series_description: str = ""
    number_of_instances: int | None = None


def date_range(date_from: date | None, date_to: date | None) -> str:
    """A DICOM DA range matching key (PS3.4 C.2.2.2.5): 'from-to', 'from-', '-to', or '' (any)."""
    if date_from is None and date_to is None:
        return ""
    if date_from is not None and date_to is not None and date_from > date_to:
        raise ValueError("date_from is after date_to")
    start = f"{date_from:%Y%m%d}" if date_from else ""
    end = f"{date_to:%Y%m%d}" if date_to else ""
    return start if start == end else f"{start}-{end}"


def study_identifier(query: StudyQuery, *, with_patient: bool = False) -> Dataset:
    """The C-FIND STUDY-level identifier: matching keys from the filters, empty return keys for the rest."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = query.study_instance_uid or ""
    ds.StudyDate = date_range(query.date_from, query.date_to)
    ds.AccessionNumber = query.accession_number or ""
    ds.StudyDescription = query.study_description or ""
    ds.ModalitiesInStudy = query.modality or ""
    if query.patient_id:
        ds.PatientID = query.patient_id
    elif with_patient:
        ds.PatientID = ""
    if with_patient:
        ds.PatientName = ""
    ds.NumberOfStudyRelatedSeries = None
    ds.NumberOfStudyRelatedInstances = None
    return ds


def series_identifier(study_instance_uid: str, series_instance_uid: str | None = None) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid or ""
    ds.Modality = ""
    ds.SeriesDescription = ""
    ds.NumberOfSeriesRelatedInstances = None
    return ds


def qido_study_filters(query: StudyQuery, *, with_patient: bool = False) -> tuple[dict[str, str], list[str]]:
    """(search filters, include fields) of the QIDO-RS studies search for `query`."""
    filters: dict[str, str] = {}
    for keyword, value in (
        ("StudyInstanceUID", query.study_instance_uid),
        ("PatientID", query.patient_id),
        ("StudyDate", date_range(query.date_from, query.date_to)),
        ("ModalitiesInStudy", query.modality),
        ("AccessionNumber", query.accession_number),
        ("StudyDescription", query.study_description),
    ):
        if value:
            filters[keyword] = value
    fields = ["StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries"]
    fields += ["NumberOfStudyRelatedInstances", "AccessionNumber", "StudyDate"]
    if with_patient:
        fields += ["PatientName", "PatientID"]
    return filters, [_TAGS[k] for k in fields]


# -- parsing ---------------------------------------------------------------------------------------------


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _modalities(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return tuple(str(v) for v in value if str(v))
    return tuple(v for v in str(value).split("\\") if v)


def _study_from_dataset(ds: Dataset, with_patient: bool) -> StudyMatch:
    info = StudyMatchInfo(
        study_instance_uid=_text(ds.get("StudyInstanceUID")),
        study_date=_text(ds.get("StudyDate")),
        study_description=_text(ds.get("StudyDescription")),
        accession_number=_text(ds.get("AccessionNumber")),
        modalities=_modalities(ds.get("ModalitiesInStudy")),
        number_of_series=_int(ds.get("NumberOfStudyRelatedSeries")),
        number_of_instances=_int(ds.get("NumberOfStudyRelatedInstances")),
    )
    if not with_patient:
        return StudyMatch(info)
    return StudyMatch(info, _text(ds.get("PatientName")), _text(ds.get("PatientID")))


def _json(item: Mapping[str, Any], keyword: str) -> Any:
    element = item.get(_TAGS[keyword]) or {}
    values = element.get("Value") or []
    if keyword == "PatientName":
        return "\\".join(str(v.get("Alphabetic", "")) for v in values if isinstance(v, dict)) or ""
    if keyword == "ModalitiesInStudy":
        return [str(v) for v in values]
    return values[0] if values else None


def _study_from_json(item: Mapping[str, Any], with_patient: bool) -> StudyMatch:
    info = StudyMatchInfo(
        study_instance_uid=_text(_json(item, "StudyInstanceUID")),
        study_date=_text(_json(item, "StudyDate")),
        study_description=_text(_json(item, "StudyDescription")),
        accession_number=_text(_json(item, "AccessionNumber")),
        modalities=_modalities(_json(item, "ModalitiesInStudy")),
        number_of_series=_int(_json(item, "NumberOfStudyRelatedSeries")),
        number_of_instances=_int(_json(item, "NumberOfStudyRelatedInstances")),
    )
    if not with_patient:
        return StudyMatch(info)
    return StudyMatch(info, _text(_json(item, "PatientName")), _text(_json(item, "PatientID")))


# -- C-FIND ----------------------------------------------------------------------------------------------


def c_find(peer: QrPeer, identifier: Dataset, limit: int | None = None) -> list[Dataset]:
    """Every pending answer of one Study Root C-FIND; cancels (C-CANCEL) after `limit` answers."""
    assoc = associate(peer, [build_context(STUDY_ROOT_FIND)])
    found: list[Dataset] = []
    try:
        responses = assoc.send_c_find(identifier, STUDY_ROOT_FIND, msg_id=1)
        for status, answer in responses:
            if not status:
                raise TransientPullError(f"no C-FIND response from {peer.label} (timeout or abort)")
            code = int(status.Status)
            if code in PENDING:
                if answer is not None:
                    found.append(answer)
                if limit is not None and len(found) >= limit:
                    assoc.send_c_cancel(1, query_model=STUDY_ROOT_FIND)
                    # Drain what the peer still sends until its final (cancelled) status.
                    for _status, _answer in responses:
                        pass
                    break
                continue
            if code != 0xFE00:
                check_final(peer, "C-FIND", code)
    finally:
        if assoc.is_established:
            assoc.release()
    return found


def find_studies(
    source: Source, query: StudyQuery, node_ae_title: str, *, with_patient: bool = False
) -> list[StudyMatch]:
    """Studies at `source` matching `query` (at most query.limit), in the PACS's order."""
    if source.type == "dicomweb":
        return _qido_studies(source, query, with_patient)
    peer = qr_peer(source, node_ae_title)
    answers = c_find(peer, study_identifier(query, with_patient=with_patient), limit=query.limit)
    matches = [_study_from_dataset(ds, with_patient) for ds in answers]
    log.info("C-FIND %s: %d studies (filters: %s)", peer.label, len(matches), query.filter_keys())
    return matches


def find_series(
    source: Source, study_instance_uid: str, node_ae_title: str, series_instance_uid: str | None = None
) -> list[SeriesMatch]:
    """The series of one study at `source` (only `series_instance_uid` when given).

    Raises StudyNotFoundError when the source has none: the study (or series) is not there.
    """
    if source.type == "dicomweb":
        found = _qido_series(source, study_instance_uid, series_instance_uid)
    else:
        peer = qr_peer(source, node_ae_title)
        found = [
            SeriesMatch(
                series_instance_uid=_text(ds.get("SeriesInstanceUID")),
                modality=_text(ds.get("Modality")),
                series_description=_text(ds.get("SeriesDescription")),
                number_of_instances=_int(ds.get("NumberOfSeriesRelatedInstances")),
            )
            for ds in c_find(peer, series_identifier(study_instance_uid, series_instance_uid))
        ]
    found = [s for s in found if s.series_instance_uid]
    if not found:
        if series_instance_uid:
            raise StudyNotFoundError(
                f"{source.name} has no series {series_instance_uid} in study {study_instance_uid}"
            )
        raise StudyNotFoundError(f"{source.name} has no study {study_instance_uid}")
    return found


# -- QIDO-RS ---------------------------------------------------------------------------------------------


def _qido_studies(source: Source, query: StudyQuery, with_patient: bool) -> list[StudyMatch]:
    assert source.url is not None  # guaranteed by Source's validator
    filters, fields = qido_study_filters(query, with_patient=with_patient)
    client = dicomweb_client(source.url, source.timeout_s)
    try:
        items = client.search_for_studies(search_filters=filters, fields=fields, limit=query.limit)
    except requests.HTTPError as exc:
        raise _http_error(exc, source, "QIDO-RS") from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise TransientPullError(f"cannot reach {source.name} ({source.url}): {type(exc).__name__}") from exc
    matches = [_study_from_json(item, with_patient) for item in items]
    log.info("QIDO-RS %s: %d studies (filters: %s)", source.name, len(matches), query.filter_keys())
    return matches


def _qido_series(
    source: Source, study_instance_uid: str, series_instance_uid: str | None
) -> list[SeriesMatch]:
    assert source.url is not None
    client = dicomweb_client(source.url, source.timeout_s)
    filters = {"SeriesInstanceUID": series_instance_uid} if series_instance_uid else {}
    fields = [_TAGS[k] for k in ("Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances")]
    try:
        items = client.search_for_series(
            study_instance_uid=study_instance_uid, search_filters=filters, fields=fields, get_remaining=True
        )
    except requests.HTTPError as exc:
        if exc.response is not None and exc.response.status_code == 404:
            return []
        raise _http_error(exc, source, "QIDO-RS") from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise TransientPullError(f"cannot reach {source.name} ({source.url}): {type(exc).__name__}") from exc
    return [
        SeriesMatch(
            series_instance_uid=_text(_json(item, "SeriesInstanceUID")),
            modality=_text(_json(item, "Modality")),
            series_description=_text(_json(item, "SeriesDescription")),
            number_of_instances=_int(_json(item, "NumberOfSeriesRelatedInstances")),
        )
        for item in items
    ]


def _http_error(exc: requests.HTTPError, source: Source, what: str) -> Exception:
    status = exc.response.status_code if exc.response is not None else 0
    message = f"{what} to {source.name} ({source.url}) answered HTTP {status}"
    if 400 <= status < 500 and status not in (408, 429):
        return PermanentPullError(message)
    return TransientPullError(message)
