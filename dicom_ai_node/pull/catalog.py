"""What the admin API is given about PACS sources (api.context.AdminContext.sources / find_studies)."""

from __future__ import annotations

from collections.abc import Callable

from dicom_ai_node.config import NodeSettings
from dicom_ai_node.domain.catalog import SourceInfo, StudyMatchInfo, StudyQuery
from dicom_ai_node.domain.peers import Source
from dicom_ai_node.errors import PermanentPullError
from dicom_ai_node.pull.query import find_studies


def source_info(source: Source) -> SourceInfo:
    if source.type == "dicomweb":
        return SourceInfo(name=source.name, type=source.type, address=source.url or "", retrieve="wado-rs")
    address = f"{source.ae_title}@{source.host}:{source.port}"
    return SourceInfo(name=source.name, type=source.type, address=address, retrieve=source.retrieve)


def study_finder(settings: NodeSettings) -> Callable[[str, StudyQuery], list[StudyMatchInfo]]:
    """Study-level query by source name; the answers keep no patient data (with_patient stays off)."""

    def find(name: str, query: StudyQuery) -> list[StudyMatchInfo]:
        source = next((s for s in settings.sources if s.name == name), None)
        if source is None:
            raise PermanentPullError(f"no source named {name!r}")
        return [match.info for match in find_studies(source, query, settings.ae_title)]

    return find
