"""Patient data out of what a model says: its errors and log lines may quote the header it read.

Models are user code. One that puts a header value into its exception (a KeyError on a per-patient
lookup, a message naming the patient) or its log would otherwise put PHI into the job's error, the node's
log and the admin page. The worker scrubs a failed inference's error, and the inference host each log
line the model's process forwards, of the patient values of the series' own header: the only PHI a model
is given, so the only PHI it can quote.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from pydicom import Dataset
from pydicom.multival import MultiValue

REDACTED = "[patient data removed]"

# The patient-identifying attributes a model could quote (names, identifiers, birth date and contact
# details of PS3.15 Table E.1-1): strings of the first header, which is what crosses to the model.
PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MedicalRecordLocator",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
)
_PN_SEPARATORS = re.compile(r"[\^=]")

Redact = Callable[[str], str]


def patient_values(ds: Dataset | None) -> list[str]:
    """The texts to remove: each value as stored, a name's components and its ^-free form, and a DA
    birth date also as YYYY-MM-DD; longest first, none shorter than 2 characters."""
    if ds is None:
        return []
    found: set[str] = set()
    for keyword in PATIENT_KEYWORDS:
        try:
            value = ds.get(keyword)
        except (ValueError, TypeError, AttributeError):
            continue  # a value pydicom cannot decode is not one a model could have quoted either
        items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
        for item in items:
            text = str(item).strip() if item is not None else ""
            parts = [p.strip() for p in _PN_SEPARATORS.split(text) if p.strip()]
            found.update({text, " ".join(parts), *parts})
            if re.fullmatch(r"\d{8}", text):
                found.add(f"{text[:4]}-{text[4:6]}-{text[6:]}")
    return sorted((v for v in found if len(v) >= 2), key=len, reverse=True)


def redactor(ds: Dataset | None) -> Redact:
    """A function that replaces the patient values of `ds` in a text, ignoring case. A value counts where
    no letter or digit adjoins it, so "Li" is cut from "patient Li" but not from "failed"."""
    values = patient_values(ds)
    if not values:
        return lambda text: text
    pattern = re.compile("|".join(rf"(?<![^\W_]){re.escape(v)}(?![^\W_])" for v in values), re.IGNORECASE)
    return lambda text: pattern.sub(REDACTED, text)


def scrub_exception(exc: BaseException, ds: Dataset | None) -> None:
    """Remove the patient values of `ds` from `exc` and every exception it chains to (cause and context,
    e.g. the model process's traceback), in place: their arguments and text attributes."""
    redact = redactor(ds)
    pending: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.args = tuple(_scrubbed(arg, redact) for arg in current.args)
        for name, value in list(vars(current).items()):
            if isinstance(value, str):
                setattr(current, name, redact(value))
        pending += [current.__cause__, current.__context__]


def _scrubbed(arg: object, redact: Redact) -> object:
    if isinstance(arg, str):
        return redact(arg)
    if arg is None or isinstance(arg, int | float | bytes):
        return arg
    # A KeyError(PersonName) or a tuple of header values prints them: keep it only if it quotes none.
    text = str(arg)
    cleaned = redact(text)
    return arg if cleaned == text else cleaned
