"""Property-based run over the admin API's OpenAPI schema (schemathesis): whatever a signed-in admin
sends, the API answers with a 2xx/4xx, never a server error.

The schema is loaded through the app object itself (signed-in users only may read it). State-changing
routes run too; on the seeded data most of them answer 404/409/422, which is what is under test.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from tests.support.admin_api import make_api

_ENV = make_api(Path(tempfile.mkdtemp(prefix="api-schemathesis-")))
schema = schemathesis.openapi.from_asgi("/openapi.json", _ENV.app, headers=_ENV.token("admin"))
STATUS_SEEN: Counter[int] = Counter()
# No 5xx, and every answer matches its documented shape. Not checked: that a schema-valid request is
# accepted (business rules refuse many: a weak password, an unknown rule id) and 405 details.
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error(case: schemathesis.Case[Any]) -> None:
    # A fresh token per case: a generated "revoke token 1" may well hit the previous one.
    response = case.call_and_validate(headers=_ENV.token("admin"), checks=CHECKS)
    STATUS_SEEN[response.status_code] += 1
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:500]}"
    )


def test_the_run_got_past_authentication() -> None:
    """Runs after the property test (file order): most answers came from the routes, not from auth."""
    assert STATUS_SEEN, "the property test did not run"
    assert STATUS_SEEN[401] + STATUS_SEEN[403] < sum(STATUS_SEEN.values()) / 10, STATUS_SEEN
    assert sum(n for code, n in STATUS_SEEN.items() if code < 300) > 50, STATUS_SEEN
