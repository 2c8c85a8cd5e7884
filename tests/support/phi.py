"""PHI canary: patient identity marked with unique strings, the user models that handle it, and the
places the marks must never reach (log, database, API answers, metrics).

The marks go into every patient-identifying attribute the node could come across (PatientName, PatientID,
PatientBirthDate, OtherPatientIDs, PatientAddress, ReferringPhysicianName, ...). A mark is searched for
case-insensitively, with ``^`` also as a space, and by its distinctive parts (a name component alone is
still a leak); the birth date also in the other ways software writes dates.

The models are `builtin` manifests whose entry is a class in this module: the node's inference child
imports it (the node runs from the checkout, so `tests` is importable there). This module must stay cheap
to import (numpy and the node's own types only): the child imports it on the first request.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydicom import Dataset, config, dcmread

from dicom_ai_node.domain.results import ModelIdentity, SegmentSpec
from dicom_ai_node.errors import InferenceError
from dicom_ai_node.infer.manifest import ModelManifest
from dicom_ai_node.infer.volume import Volume

log = logging.getLogger(__name__)

# One value per patient-identifying attribute, each unique to this test.
MARKS: dict[str, str] = {
    "PatientName": "CANARY^NAME7Q3",
    "PatientID": "CANARYID7Q3",
    "PatientBirthDate": "19170923",
    "OtherPatientIDs": "CANARYOTHER7Q3",
    "PatientAddress": "7Q3 CANARYSTREET",
    "ReferringPhysicianName": "CANARYREF^DOC7Q3",
    "PatientMotherBirthName": "CANARYMOTHER^MUM7Q3",
    "PatientTelephoneNumbers": "0007733777",
}
# An ACR-NEMA style birth date (not a valid DA): pydicom quotes invalid values in its warnings.
MALFORMED_BIRTH_DATE = "1917.09.23"
# A single-component name: highdicom quotes such names in a warning.
SINGLE_COMPONENT_NAME = "CANARYSOLO7Q3"


def _needles() -> list[tuple[str, re.Pattern[str]]]:
    """(what, pattern) for every form of every mark; digit-only forms must stand alone (not inside a
    UID or a number), everything else matches anywhere, ignoring case."""
    texts: set[str] = set()
    for value in (*MARKS.values(), SINGLE_COMPONENT_NAME):
        texts.update({value, value.replace("^", " ")})
        texts.update(part for part in re.split(r"[\^ ]", value) if "7Q3" in part and len(part) > 3)
    texts.update(
        {MALFORMED_BIRTH_DATE, "1917-09-23", "23.09.1917", "09/23/1917", "1917/09/23", "1917, 9, 23"}
    )
    needles = []
    for text in sorted(texts):
        if text.isdigit():
            needles.append((text, re.compile(rf"(?<![0-9.]){text}(?![0-9])")))
        else:
            needles.append((text, re.compile(re.escape(text), re.IGNORECASE)))
    return needles


NEEDLES = _needles()


@dataclass(frozen=True)
class Finding:
    place: str
    mark: str
    context: str

    def __str__(self) -> str:
        return f"{self.place}: {self.mark!r} in ...{self.context}..."


def find_marks(place: str, text: str) -> list[Finding]:
    """Every mark in `text`, with 60 characters around it."""
    found = []
    for mark, pattern in NEEDLES:
        for m in pattern.finditer(text):
            found.append(
                Finding(place, mark, text[max(0, m.start() - 60) : m.end() + 60].replace("\n", "\\n"))
            )
    return found


@dataclass
class Evidence:
    """Texts collected from one place kind (e.g. "api"), keyed by where each came from."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, place: str, text: str) -> None:
        self.texts[place] = text

    def findings(self) -> list[Finding]:
        return [f for place, text in self.texts.items() for f in find_marks(place, text)]


# -- marked data sets -----------------------------------------------------------------------------------


def mark(ds: Dataset, *, birth_date: str | None = None, patient_name: str | None = None) -> Dataset:
    """Put the marks into `ds` (in place); `birth_date`/`patient_name` replace the usual ones."""
    values = dict(MARKS)
    if birth_date is not None:
        values["PatientBirthDate"] = birth_date
    if patient_name is not None:
        values["PatientName"] = patient_name
    # Writing an invalid value on purpose (the malformed birth date): no warning in the test's own output.
    with config.disable_value_validation():
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return ds


def mark_files(
    paths: Iterable[Path],
    series_description: str,
    *,
    edit: Callable[[Dataset], None] | None = None,
    birth_date: str | None = None,
    patient_name: str | None = None,
) -> list[Path]:
    """Mark each file in place and set its SeriesDescription (what the test's rules route on)."""
    out = []
    for path in paths:
        ds = dcmread(path)
        mark(ds, birth_date=birth_date, patient_name=patient_name)
        ds.SeriesDescription = series_description
        if edit is not None:
            edit(ds)
        with config.disable_value_validation():
            ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


# -- user models (builtin manifests pointing here) --------------------------------------------------------


class _CanaryModel:
    task: Literal["segmentation"] = "segmentation"
    accepts_modalities: tuple[str, ...] = ("CT",)

    def __init__(self, manifest: ModelManifest | None = None, device: str = "cpu") -> None:
        name = manifest.name if manifest else type(self).__name__.lower()
        self.identity = ModelIdentity(name, manifest.version if manifest else "1.0")
        self.segments: list[SegmentSpec] = manifest.segment_specs if manifest else []

    def _patient(self, volume: Volume) -> str:
        ds = volume.datasets[0]
        return f"{ds.PatientName} ({ds.PatientID}, born {ds.PatientBirthDate}, {ds.OtherPatientIDs})"


class CanaryThresholdModel(_CanaryModel):
    """Label 1 where the CT is above 0 HU (the phantom's body); reads the patient header (as models do)."""

    def segment(self, volume: Volume) -> np.ndarray:
        log.warning("segmenting the body of %s", self._patient(volume))
        return (volume.array > 0).astype(np.uint8)


class CanaryRaisingModel(_CanaryModel):
    """A buggy user model whose exception quotes the patient: a KeyError on a per-patient lookup."""

    def segment(self, volume: Volume) -> np.ndarray:
        ds = volume.datasets[0]
        priors: dict[object, float] = {}
        return np.full(volume.shape, priors[ds.PatientName, ds.PatientID, ds.PatientBirthDate], np.uint8)


class CanaryRefusingModel(_CanaryModel):
    """A user model that refuses with the node's own error class, naming the patient in its message."""

    def segment(self, volume: Volume) -> np.ndarray:
        raise InferenceError(f"no atlas fits patient {self._patient(volume)}")


MODELS = {
    "phi-threshold": "CanaryThresholdModel",
    "phi-raises": "CanaryRaisingModel",
    "phi-refuses": "CanaryRefusingModel",
}


def write_models(models_dir: Path) -> Path:
    """A model directory per entry of MODELS (manifest only: builtin format, no weights)."""
    for name, cls in MODELS.items():
        model_dir = models_dir / name
        model_dir.mkdir(parents=True, exist_ok=True)
        manifest = {
            "name": name,
            "version": "1.0.0",
            "task": "segmentation",
            "format": "builtin",
            "entry": f"{__name__}:{cls}",
            "description": "PHI canary test model (not a medical model)",
            "accepts": {"modalities": ["CT"]},
            "outputs": {
                "activation": "none",
                "segments": [
                    {
                        "value": 1,
                        "label": "Body",
                        "type": {"value": "123037004", "scheme": "SCT", "meaning": "Body structure"},
                    }
                ],
            },
            "licence": "Apache-2.0 (made by the test)",
            "training_data": "none",
            "intended_use": "tests only",
        }
        (model_dir / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return models_dir


def write_rules(path: Path, routes: Mapping[str, tuple[str, list[str]]]) -> Path:
    """rules.yaml with one rule per SeriesDescription: description -> (model, destinations)."""
    rules = [
        {
            "id": f"phi-{i}",
            "version": 1,
            "description": f"canary series -> {model}",
            "conditions": [
                {"attribute": "Modality", "equals": "CT"},
                {"attribute": "SeriesDescription", "equals": description},
            ],
            "action": {"model": model, "destinations": destinations, "priority": 5, "quiet_period_s": 1},
        }
        for i, (description, (model, destinations)) in enumerate(routes.items())
    ]
    path.write_text(yaml.safe_dump({"rules": rules}, sort_keys=False))
    return path


# -- collecting what the node shows -----------------------------------------------------------------------


class AdminClient:
    """Raw HTTP to the node's admin API with an API token: every answer as text, whatever its status."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url
        self.token = token

    def request(
        self, path: str, body: Any = None, method: str = "GET", token: str | None = None
    ) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return int(resp.status), resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode("utf-8", "replace")

    def json(self, path: str, body: Any = None, method: str = "GET") -> Any:
        status, text = self.request(path, body, method)
        if status >= 400:
            raise AssertionError(f"{method} {path}: HTTP {status}: {text}")
        return json.loads(text)


def crawl_api(client: AdminClient, evidence: Evidence) -> None:
    """GET every route of the OpenAPI schema (path parameters filled with every known job, series, rule
    and version), the routes outside it (page, metrics, exports), and the read-only POSTs."""
    schema = client.json("/openapi.json")
    evidence.add("GET /openapi.json", json.dumps(schema))
    jobs = client.json("/api/jobs?limit=500")["items"]
    series = client.json("/api/series?limit=500")["items"]
    rules = [r["rule"] for r in client.json("/api/rules")]
    values: dict[str, list[str]] = {
        "job_id": [str(j["id"]) for j in jobs],
        "series_instance_uid": [s["series_instance_uid"] for s in series],
        "rule_id": [str(r["id"]) for r in rules],
        "version": ["1"],
    }
    for route, operations in schema["paths"].items():
        if "get" not in operations:
            continue
        params = re.findall(r"{(\w+)}", route)
        unknown = [p for p in params if p not in values]
        if unknown:
            raise AssertionError(f"no values for {unknown} of GET {route}: extend crawl_api")
        paths = [route]
        for param in params:
            paths = [p.replace(f"{{{param}}}", urllib.parse.quote(v)) for p in paths for v in values[param]]
        for path in paths:
            if "/export" in path and "audit" in path:
                continue  # below, in both formats
            status, text = client.request(path)
            evidence.add(f"GET {path} ({status})", text)
    for path in (
        "/",
        "/metrics",
        "/api/audit/export?format=json",
        "/api/audit/export?format=csv",
        "/api/jobs?limit=500&status=dead",
        "/api/jobs?limit=500&status=failed",
    ):
        status, text = client.request(path)
        evidence.add(f"GET {path} ({status})", text)
    for uid in values["series_instance_uid"]:
        status, text = client.request("/api/rules/dry-run", {"series_instance_uid": uid}, "POST")
        evidence.add(f"POST /api/rules/dry-run {uid} ({status})", text)
    for rule in rules:
        status, text = client.request("/api/rules/replay", {"rule": rule, "limit": 500}, "POST")
        evidence.add(f"POST /api/rules/replay {rule['id']} ({status})", text)


def dump_sqlite(path: Path, evidence: Evidence) -> None:
    """Every column of every row of every table, and the raw bytes of the database files (so a value
    written and later overwritten still counts)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            cursor = con.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - names from sqlite_master
            columns = [d[0] for d in cursor.description]
            for n, row in enumerate(cursor):
                for column, value in zip(columns, row, strict=True):
                    if isinstance(value, bytes):
                        value = value.decode("utf-8", "replace")
                    if isinstance(value, str) and value:
                        evidence.add(f"db {table}.{column} row {n}", value)
    finally:
        con.close()
    for file in sorted(path.parent.glob(path.name + "*")):
        evidence.add(f"file {file.name}", file.read_bytes().decode("latin-1"))
