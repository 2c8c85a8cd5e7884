"""The DICOMweb client for QIDO-RS and WADO-RS, with a timeout on every request."""

from __future__ import annotations

import requests
from dicomweb_client.api import DICOMwebClient


def dicomweb_client(url: str, timeout_s: float) -> DICOMwebClient:
    session = requests.Session()
    client = DICOMwebClient(url=url.rstrip("/"), session=session)
    # dicomweb-client has no timeout setting of its own: bound every request through the session.
    original = session.request

    def request_with_timeout(*args: object, **kwargs: object) -> requests.Response:
        kwargs.setdefault("timeout", timeout_s)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    session.request = request_with_timeout  # type: ignore[method-assign]
    return client
