"""Property-based fuzzing of the running API from its own OpenAPI document (schemathesis).

Valid and invalid requests are generated for every operation and sent through gunicorn: no
answer may be a 5xx, every answer must match the document (status, media type, body schema,
headers), and requests that break the document must be refused with a 4xx.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from sluice_api.openapi import document
from sluice_api.routes import ROUTES
from tests.e2e.conftest import Api

schema = schemathesis.openapi.from_dict(document(ROUTES))
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=30, database="none"
)
# A request that breaks the document may also be refused as too large (413, documented on every
# operation that takes a body): a string past its maxLength can be past the body limit as well.
_rejection = schema.config.checks.negative_data_rejection
_rejection.expected_statuses = [*_rejection.expected_statuses, "413"]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def auth(api: Api) -> Iterator[dict[str, str]]:
    token, client = api.user()
    # Something to find: a workflow of each trigger type and a run, so reads are not all 404s.
    for trigger in ({"type": "manual"}, {"type": "webhook"}):
        wf = client.post(
            "/api/workflows",
            json={
                "name": "fuzz",
                "trigger": trigger,
                "steps": [{"id": "a", "type": "transform", "config": {"value": 1}}],
            },
        ).json()
        client.post(f"/api/workflows/{wf['id']}/run", json={"delay": 3_600_000})
    yield {"Authorization": f"Bearer {token}"}
    client.close()


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case, api: Api, auth: dict[str, str]) -> None:
    case.call_and_validate(base_url=api.base, headers=auth, checks=CHECKS)
