"""Query building for PACS sources: C-FIND identifiers and QIDO-RS filters from the operator's filters, and
answers read without patient data unless the CLI asks."""

from __future__ import annotations

from datetime import date

import pytest
from pydicom import Dataset

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.domain.catalog import StudyQuery
from dicom_ai_node.errors import ConfigError
from dicom_ai_node.pull.catalog import source_info
from dicom_ai_node.pull.query import (
    _study_from_dataset,
    _study_from_json,
    date_range,
    qido_study_filters,
    series_identifier,
    study_identifier,
)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (None, None, ""),
        (date(2024, 1, 2), None, "20240102-"),
        (None, date(2024, 1, 31), "-20240131"),
        (date(2024, 1, 2), date(2024, 1, 31), "20240102-20240131"),
        (date(2024, 1, 2), date(2024, 1, 2), "20240102"),
    ],
)
def test_date_range_is_a_dicom_range_matching_key(
    start: date | None, end: date | None, expected: str
) -> None:
    assert date_range(start, end) == expected


def test_date_range_refuses_an_inverted_range() -> None:
    with pytest.raises(ValueError, match="after"):
        date_range(date(2024, 2, 1), date(2024, 1, 1))


def test_study_identifier_has_matching_keys_for_filters_and_empty_return_keys() -> None:
    query = StudyQuery(patient_id="PID-1", date_from=date(2024, 1, 1), modality="CT", accession_number="A1")
    ds = study_identifier(query)
    assert ds.QueryRetrieveLevel == "STUDY"
    assert (ds.PatientID, ds.StudyDate, ds.ModalitiesInStudy, ds.AccessionNumber) == (
        "PID-1",
        "20240101-",
        "CT",
        "A1",
    )
    assert ds.StudyInstanceUID == "" and ds.StudyDescription == ""
    assert "NumberOfStudyRelatedInstances" in ds and "NumberOfStudyRelatedSeries" in ds
    assert "PatientName" not in ds  # not asked for: the PACS sends no name back


def test_study_identifier_without_patient_filter_asks_for_no_patient_data() -> None:
    ds = study_identifier(StudyQuery(study_description="CHEST*"))
    assert "PatientID" not in ds and "PatientName" not in ds
    with_patient = study_identifier(StudyQuery(), with_patient=True)
    assert with_patient.PatientID == "" and with_patient.PatientName == ""


def test_series_identifier() -> None:
    ds = series_identifier("1.2.3", "1.2.3.4")
    assert (ds.QueryRetrieveLevel, ds.StudyInstanceUID, ds.SeriesInstanceUID) == (
        "SERIES",
        "1.2.3",
        "1.2.3.4",
    )
    assert "Modality" in ds and "NumberOfSeriesRelatedInstances" in ds


def test_qido_filters_hold_only_the_given_filters() -> None:
    query = StudyQuery(date_to=date(2023, 12, 31), modality="MR", study_description="HEAD*")
    filters, fields = qido_study_filters(query)
    assert filters == {"StudyDate": "-20231231", "ModalitiesInStudy": "MR", "StudyDescription": "HEAD*"}
    assert "00201208" in fields and "00100010" not in fields and "00100020" not in fields
    _, with_patient = qido_study_filters(query, with_patient=True)
    assert {"00100010", "00100020"} <= set(with_patient)


def test_filter_keys_never_carry_values() -> None:
    query = StudyQuery(patient_id="PID-SECRET", modality="CT")
    assert query.filter_keys() == ["patient_id", "modality"]


def _answer() -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = "1.2.3"
    ds.StudyDate = "20240105"
    ds.StudyDescription = "CHEST"
    ds.AccessionNumber = "ACC"
    ds.ModalitiesInStudy = ["CT", "SR"]
    ds.NumberOfStudyRelatedSeries = 2
    ds.NumberOfStudyRelatedInstances = 49
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-1"
    return ds


def test_c_find_answers_are_read_without_patient_data_unless_asked() -> None:
    match = _study_from_dataset(_answer(), with_patient=False)
    assert match.info.modalities == ("CT", "SR") and match.info.number_of_instances == 49
    assert (match.patient_name, match.patient_id) == ("", "")
    assert "Doe" not in repr(match)
    named = _study_from_dataset(_answer(), with_patient=True)
    assert (named.patient_name, named.patient_id) == ("Doe^Jane", "PID-1")
    assert "Doe" not in repr(named)  # never in a log line by accident


def test_qido_answers_are_read_like_c_find_answers() -> None:
    item = {
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "00080061": {"vr": "CS", "Value": ["CT", "SEG"]},
        "00201208": {"vr": "IS", "Value": [20]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
    }
    match = _study_from_json(item, with_patient=True)
    assert match.info.study_instance_uid == "1.2.3"
    assert match.info.modalities == ("CT", "SEG") and match.info.number_of_instances == 20
    assert match.patient_name == "Doe^Jane"
    assert _study_from_json(item, with_patient=False).patient_name == ""


def test_sources_are_validated_like_destinations() -> None:
    settings = NodeSettings(
        sources=[
            {"name": "pacs", "type": "dicom", "ae_title": "PACS", "host": "10.0.0.1", "port": 104},
            {"name": "web", "type": "dicomweb", "url": "http://pacs/dicom-web"},
        ]
    )
    assert settings.source("pacs").retrieve == "move"
    assert source_info(settings.source("web")).retrieve == "wado-rs"
    assert source_info(settings.source("pacs")).address == "PACS@10.0.0.1:104"
    with pytest.raises(ConfigError):
        settings.source("nope")
    with pytest.raises(ValueError, match="unique"):
        NodeSettings(sources=[{"name": "a", "type": "dicomweb", "url": "http://x"}] * 2)
    with pytest.raises(ValueError, match="needs ae_title"):
        NodeSettings(sources=[{"name": "a", "type": "dicom", "host": "h", "port": 1}])
