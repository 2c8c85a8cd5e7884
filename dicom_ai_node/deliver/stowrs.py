"""STOW-RS delivery and QIDO-RS read-back (DICOMweb, PS3.18), with dicomweb-client.

Failure classes follow the same rules as C-STORE: HTTP 4xx (but 408/429) and failed SOPs with a
0xA9xx/0xCxxx reason are permanent; connection errors, timeouts, 5xx, 408/429 and 0xA7xx reasons are
transient.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread

from dicom_ai_node.deliver.dimse import StoreReport
from dicom_ai_node.errors import PermanentDeliveryError, QueryNotSupportedError, TransientDeliveryError

log = logging.getLogger(__name__)

_RETRYABLE_HTTP = {408, 429}
# QIDO-RS answers of a service that stores (STOW-RS) but offers no search: no such resource, method
# not allowed, not implemented. A search with no match answers 200 [] or 204, not these.
_QUERY_NOT_SUPPORTED_HTTP = {404, 405, 501}


def _client(url: str, timeout_s: float) -> DICOMwebClient:
    session = requests.Session()
    client = DICOMwebClient(url=url.rstrip("/"), session=session)
    # dicomweb-client has no timeout setting of its own: bound every request through the session.
    original = session.request

    def request_with_timeout(*args: object, **kwargs: object) -> requests.Response:
        kwargs.setdefault("timeout", timeout_s)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    session.request = request_with_timeout  # type: ignore[method-assign]
    return client


def _classify_http(exc: requests.HTTPError, url: str) -> Exception:
    status = exc.response.status_code if exc.response is not None else 0
    message = f"STOW-RS to {url} answered HTTP {status}"
    if 400 <= status < 500 and status not in _RETRYABLE_HTTP:
        return PermanentDeliveryError(message)
    return TransientDeliveryError(message)


def store_instances(url: str, paths: Sequence[Path], timeout_s: float = 60) -> StoreReport:
    """STOW-RS the files in one request; raise unless every SOP instance is reported stored."""
    datasets: list[Dataset] = [dcmread(p) for p in paths]
    client = _client(url, timeout_s)
    try:
        response = client.store_instances(datasets)
    except requests.HTTPError as exc:
        raise _classify_http(exc, url) from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise TransientDeliveryError(f"cannot reach DICOMweb service {url}: {type(exc).__name__}") from exc
    failed = list(response.get("FailedSOPSequence", []) if response is not None else [])
    if failed:
        reasons = {
            str(f.get("ReferencedSOPInstanceUID", "?")): int(f.get("FailureReason", 0)) for f in failed
        }
        message = f"STOW-RS to {url}: {len(failed)} SOP instance(s) failed: " + ", ".join(
            f"{uid} (0x{code:04X})" for uid, code in reasons.items()
        )
        if all(0xA700 <= code <= 0xA7FF for code in reasons.values()):
            raise TransientDeliveryError(message)
        raise PermanentDeliveryError(message)
    sent = [str(ds.SOPInstanceUID) for ds in datasets]
    log.debug("STOW-RS to %s: %d instances stored", url, len(sent))
    return StoreReport(sent=sent)


def find_sop_instances(
    url: str, study_instance_uid: str, series_instance_uid: str, timeout_s: float = 60
) -> set[str]:
    """QIDO-RS: the SOP Instance UIDs the service holds in one series."""
    client = _client(url, timeout_s)
    try:
        found = client.search_for_instances(
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            fields=["00080018"],
            get_remaining=True,
        )
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in _QUERY_NOT_SUPPORTED_HTTP:
            raise QueryNotSupportedError(f"QIDO-RS search at {url} answered HTTP {status}") from exc
        raise _classify_http(exc, url) from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise TransientDeliveryError(f"cannot reach DICOMweb service {url}: {type(exc).__name__}") from exc
    return {str(item["00080018"]["Value"][0]) for item in found if "00080018" in item}


def probe(url: str, timeout_s: float = 10) -> str:
    """QIDO-RS for one study: proves the service answers DICOMweb queries (no PHI is read or kept)."""
    client = _client(url, timeout_s)
    try:
        found = client.search_for_studies(limit=1, fields=["0020000D"])
    except requests.HTTPError as exc:
        raise _classify_http(exc, url) from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise TransientDeliveryError(f"cannot reach DICOMweb service {url}: {type(exc).__name__}") from exc
    return f"QIDO-RS {url}/studies answered ({len(found)} study shown of limit 1)"
