"""The DICOM and DICOMweb peers the node talks to: who may send (AllowedPeer), where results go
(Destination), where studies are pulled from (Source).

Plain validated data, read from the `dicom.allowed_peers`, `destinations` and `sources` sections of the
configuration (config.py uses these types as its field types) and passed to the stages that need them.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# PS3.5 6.2: AE titles are at most 16 characters, no backslash or control characters.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def check_ae_title(value: str) -> str:
    value = value.strip()
    if not _AE_TITLE.match(value):
        raise ValueError(f"not a valid AE title (1-16 printable characters, no backslash): {value!r}")
    return value


# Certificate subject attribute names as Python's ssl module reports them -> their RFC 4514 short names.
_SUBJECT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

SubjectName = frozenset[tuple[str, str]]


def parse_subject(text: str) -> SubjectName:
    """A distinguished name as written in the config ("CN=STORESCU,O=Hospital", RFC 4514 style, or openssl's
    "/O=Hospital/CN=STORESCU") -> its set of (ATTRIBUTE, value) pairs; order does not matter, so both
    RFC 4514 (reversed) and openssl's order compare equal. A backslash escapes a separator."""
    text = text.strip()
    separator = "/" if text.startswith("/") else ","
    body = text[1:] if separator == "/" else text
    parts: list[str] = []
    current, escaped = "", False
    for char in body:
        if escaped:
            current, escaped = current + char, False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    pairs: set[tuple[str, str]] = set()
    for part in parts:
        name, eq, value = part.partition("=")
        if not eq or not name.strip() or not value.strip():
            raise ValueError(f"not a distinguished name (ATTR=value, comma-separated): {text!r}")
        pairs.add((name.strip().upper(), value.strip()))
    return frozenset(pairs)


def subject_from_ssl(subject: tuple[tuple[tuple[str, str], ...], ...]) -> SubjectName:
    """`ssl.SSLSocket.getpeercert()["subject"]` as the same pairs `parse_subject` gives."""
    return frozenset(
        (_SUBJECT_NAMES.get(name, name).upper(), value.strip()) for rdn in subject for name, value in rdn
    )


def normalise_fingerprint(value: str) -> str:
    """SHA-256 fingerprint as `openssl x509 -fingerprint -sha256` prints it (AB:CD:...) or plain hex ->
    64 lower-case hex digits."""
    digits = value.strip().removeprefix("sha256 Fingerprint=").replace(":", "").lower()
    if not _SHA256_HEX.match(digits):
        raise ValueError(f"not a SHA-256 fingerprint (64 hex digits, colons allowed): {value!r}")
    return digits


class _Peer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AllowedPeer(_Peer):
    """A calling AE allowed to associate; `hosts` (IP addresses or networks) narrows it further.

    With DICOM TLS (`dicom.tls`), `tls_subject` and/or `tls_fingerprint` bind the AE title to a client
    certificate: an association calling this AE title must present a certificate with that subject
    (attributes in any order) / that SHA-256 fingerprint, or it is rejected.
    """

    ae_title: str
    hosts: list[str] = Field(default_factory=list)
    tls_subject: str | None = None
    tls_fingerprint: str | None = None
    # A completion signal (docs/routing-rules.md, "When is a series complete?"): this peer sends each
    # series whole in one association (Orthanc forwards stable series that way), so the series received
    # in an association it releases (not aborts) are complete at once, without the quiet period. Per AE
    # title: set it on every entry of that AE title.
    series_complete_on_release: bool = False

    _ae = field_validator("ae_title")(check_ae_title)

    @field_validator("hosts")
    @classmethod
    def _hosts_are_ip(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            ipaddress.ip_network(host, strict=False)  # raises ValueError with the bad value
        return hosts

    @field_validator("tls_subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        if value is not None:
            parse_subject(value)
        return value

    @field_validator("tls_fingerprint")
    @classmethod
    def _fingerprint(cls, value: str | None) -> str | None:
        return None if value is None else normalise_fingerprint(value)

    @property
    def binds_certificate(self) -> bool:
        return self.tls_subject is not None or self.tls_fingerprint is not None


class DestinationTls(_Peer):
    """DICOM TLS to a destination (PS3.15 B.9, BCP 195): the peer's certificate must chain to `ca` and name
    the destination's `host` (DNS name or IP in its subjectAltName); `cert` + `key` are the node's client
    certificate, for a PACS that requires one."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> DestinationTls:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key must be given together")
        return self


class Destination(_Peer):
    """Where results are sent: `dicom` (C-STORE SCU to ae_title@host:port) or `dicomweb` (STOW-RS to url)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    type: Literal["dicom", "dicomweb"] = "dicom"
    # type dicom
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    calling_ae_title: str | None = None
    max_pdu: int = Field(131072, ge=0)
    # type dicomweb: the DICOMweb root, e.g. http://pacs:8042/dicom-web
    url: str | None = Field(default=None, pattern=r"^https?://")
    timeout_s: float = Field(60, gt=0)
    # SEG encoding for this destination (docs/configuration.md): BINARY with empty frames omitted is the default;
    # some viewer versions misplace SEGs with omitted frames (keep them with false). LABELMAP (+RLE) is
    # much smaller but new: opt-in, and a PACS that refuses it gets the plain BINARY SEG instead.
    # auto: BINARY, or FRACTIONAL (8-bit) when frames are not byte-aligned (OHIF misreads those BINARY SEGs).
    seg_format: Literal["auto", "binary", "fractional", "labelmap"] = "auto"
    seg_omit_empty_frames: bool = True
    # Also send a few Secondary Capture key images with the overlay burned in (marked derived), for
    # viewers that cannot show DICOM SEG.
    key_images: bool = False
    # After sending, ask the destination (C-FIND / QIDO-RS) whether it now holds every object; a job is
    # "delivered, verified" only then, and is retried when the read-back misses something.
    verify: bool = True
    # type dicom: DICOM TLS to this destination (C-STORE, the C-FIND read-back and the C-ECHO probe).
    tls: DestinationTls | None = None

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else check_ae_title(value)

    @model_validator(mode="after")
    def _fields_of_type(self) -> Destination:
        if self.type == "dicom":
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"a dicom destination needs {', '.join(missing)}")
        elif self.url is None:
            raise ValueError("a dicomweb destination needs url")
        elif self.tls is not None:
            raise ValueError("tls is for dicom destinations; a dicomweb destination uses an https:// url")
        return self


class Source(_Peer):
    """A PACS the node pulls studies from (`dicom-ai-node pull`, the page's PACS view).

    `dicom`: C-FIND to ae_title@host:port, then C-MOVE to the node's own AE (the PACS must know the node's
    AE title, host and port as a move destination, and `dicom.allowed_peers` must let the PACS's AE in) or
    C-GET on the same association (`retrieve: get`). `dicomweb`: QIDO-RS + WADO-RS under `url`.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    type: Literal["dicom", "dicomweb"] = "dicom"
    # type dicom
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    calling_ae_title: str | None = None
    retrieve: Literal["move", "get"] = "move"
    max_pdu: int = Field(131072, ge=0)
    # type dicomweb: the DICOMweb root, e.g. http://pacs:8042/dicom-web
    url: str | None = Field(default=None, pattern=r"^https?://")
    # Per request (DICOMweb) or per DIMSE message; C-MOVE also waits this long with no new instance.
    timeout_s: float = Field(60, gt=0)

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else check_ae_title(value)

    @model_validator(mode="after")
    def _fields_of_type(self) -> Source:
        if self.type == "dicom":
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"a dicom source needs {', '.join(missing)}")
        elif self.url is None:
            raise ValueError("a dicomweb source needs url")
        return self
