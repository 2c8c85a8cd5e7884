"""What the admin API may know about the rest of the node, as pure data (DESIGN.md, "Control plane").

The api package imports domain + persistence only; the node builds these from its settings, the delivery
registry and the model registry, and hands them in through `api.context.AdminContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import Any


@dataclass(frozen=True)
class DestinationInfo:
    """A configured destination as the admin page shows it (no secrets: the node leaves them out)."""

    name: str
    type: str  # dicom | dicomweb
    address: str  # AE@host:port or the DICOMweb root URL
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceInfo:
    """A configured PACS source (query/retrieve) as the admin page shows it; no secrets."""

    name: str
    type: str  # dicom | dicomweb
    address: str  # AE@host:port or the DICOMweb root URL
    retrieve: str  # move | get (dicom) or wado-rs (dicomweb)


@dataclass(frozen=True)
class StudyQuery:
    """Study-level query filters (C-FIND / QIDO-RS). Values are the operator's input: never log or audit
    them (patient_id is PHI); `None` means no filter."""

    study_instance_uid: str | None = None
    patient_id: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    modality: str | None = None
    accession_number: str | None = None
    study_description: str | None = None
    limit: int = 100

    def filter_keys(self) -> list[str]:
        """The names of the filters given (what the audit may record), never their values."""
        names: tuple[str, ...] = (
            "study_instance_uid",
            "patient_id",
            "date_from",
            "date_to",
            "modality",
            "accession_number",
        )
        names += ("study_description",)
        return [n for n in names if getattr(self, n) not in (None, "")]


@dataclass(frozen=True)
class StudyMatchInfo:
    """One study a source holds, without patient name, ID or birth date (the page never shows PHI)."""

    study_instance_uid: str
    study_date: str = ""  # YYYYMMDD as the PACS gave it
    study_description: str = ""
    accession_number: str = ""
    modalities: tuple[str, ...] = ()
    number_of_series: int | None = None
    number_of_instances: int | None = None


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of a destination test (C-ECHO for DIMSE, a QIDO-RS query for DICOMweb)."""

    ok: bool
    detail: str
    elapsed_s: float


@dataclass(frozen=True)
class WeightsInfo:
    file: str
    sha256: str
    verified: bool | None  # None: not checked (yet)


@dataclass(frozen=True)
class ModelInfo:
    """A model manifest summary: what an admin must know before routing series to it."""

    name: str
    version: str
    task: str
    format: str
    modalities: list[str] = field(default_factory=list)
    body_parts: list[str] = field(default_factory=list)
    licence: str = ""
    provenance: str = ""
    intended_use: str = ""
    limits: str = ""
    source: str = ""  # builtin | a directory path
    weights: list[WeightsInfo] = field(default_factory=list)


@dataclass(frozen=True)
class CheckResult:
    """One readiness check (database, spool, inference)."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class AuthSettings:
    """Sign-in policy of the admin API, from `http` settings."""

    idle_s: float = 30 * 60
    max_age_s: float = 12 * 3600
    secure_cookie: bool = False  # True when the API is served over TLS
    login_max_failures: int = 5
    login_window_s: float = 15 * 60
    metrics_allowed_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # Host header names the API answers (DNS rebinding defence); "*" any, "*.example.org" its subdomains.
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
