"""The STOW-RS response body (PS3.18 10.5.3, Store Instances Response Module) in the DICOM JSON model
(PS3.18 F.2, application/dicom+json) or the Native DICOM Model (PS3.19 A.1, application/dicom+xml)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from xml.etree import ElementTree as ET

from pydicom import Dataset
from pydicom.datadict import keyword_for_tag

from dicom_ai_node.domain.ingest import IngestResult

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
_NATIVE_NS = "http://dicom.nema.org/PS3.19/models/NativeDICOM"


def store_response(results: Sequence[IngestResult]) -> Dataset:
    """ReferencedSOPSequence (0008,1199) for stored instances (duplicates included: they are held),
    FailedSOPSequence (0008,1198) with FailureReason (0008,1197) for the others.

    No RetrieveURL (0008,1190): the node serves no WADO-RS, and PS3.18 asks for the URL only where the
    instances can be retrieved from this origin server.
    """
    ds = Dataset()
    stored, failed = [], []
    for r in results:
        item = Dataset()
        item.ReferencedSOPClassUID = r.sop_class_uid
        item.ReferencedSOPInstanceUID = r.sop_instance_uid
        if r.stored:
            stored.append(item)
        else:
            item.FailureReason = r.status
            failed.append(item)
    if stored:
        ds.ReferencedSOPSequence = stored
    if failed:
        ds.FailedSOPSequence = failed
    return ds


def wants_xml(accept: str | None) -> bool:
    """XML only when the client asks for it and not for JSON first; JSON is the default (PS3.18 8.7)."""
    if not accept:
        return False
    kinds = [part.split(";", 1)[0].strip().lower() for part in accept.split(",")]
    if "application/dicom+xml" not in kinds:
        return False
    return "application/dicom+json" not in kinds or kinds.index(DICOM_XML) < kinds.index(DICOM_JSON)


def to_xml(ds: Dataset) -> bytes:
    """The Native DICOM Model rendering of a (small, non-binary) data set."""
    root = ET.Element("NativeDicomModel", {"xmlns": _NATIVE_NS, "xml:space": "preserve"})
    _xml_attributes(root, ds.to_json_dict())
    body = bytes(ET.tostring(root, encoding="utf-8", xml_declaration=False))
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body


def _xml_attributes(parent: ET.Element, attrs: dict[str, Any]) -> None:
    for tag in sorted(attrs):
        element = attrs[tag]
        vr = str(element.get("vr", "UN"))
        node = ET.SubElement(parent, "DicomAttribute", {"tag": tag, "vr": vr})
        keyword = keyword_for_tag(int(tag, 16))
        if keyword:
            node.set("keyword", keyword)
        for number, value in enumerate(element.get("Value", []), start=1):
            if vr == "SQ":
                item = ET.SubElement(node, "Item", {"number": str(number)})
                _xml_attributes(item, value)
            else:
                ET.SubElement(node, "Value", {"number": str(number)}).text = str(value)
