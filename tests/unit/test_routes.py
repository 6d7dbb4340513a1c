"""The route table and the OpenAPI document agree: every responder is documented, and nothing more."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from sluice_api.openapi import HTTP_METHODS, document, openapi_path
from sluice_api.resources.base import Resource
from sluice_api.routes import ROUTES, Route

IDS = [route.template for route in ROUTES]


def responders(resource: type[Resource]) -> set[str]:
    """The HTTP methods the resource answers (Falcon calls ``on_<method>``)."""
    return {name.removeprefix("on_") for name in dir(resource) if name.startswith("on_")}


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_every_responder_has_a_documented_operation_and_back(route: Route) -> None:
    answered, documented = responders(route.resource), set(route.resource.operations)
    assert answered - documented == set(), f"{route.template}: responders without a documented operation"
    assert documented - answered == set(), f"{route.template}: documented operations without a responder"
    assert documented <= set(HTTP_METHODS)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_the_query_parameters_taken_are_the_documented_ones(route: Route) -> None:
    documented = {
        p["name"] for op in route.resource.operations.values() for p in op.get("parameters", []) if p["in"] == "query"
    }
    assert documented == set(route.resource.query_params)


def test_each_route_is_one_path_and_each_operation_is_named_once() -> None:
    paths = document(ROUTES)["paths"]
    assert len(paths) == len(ROUTES) == len({r.template for r in ROUTES})
    ids = [op["operationId"] for item in paths.values() for m, op in item.items() if m != "parameters"]
    assert len(ids) == len(set(ids)) == sum(len(r.resource.operations) for r in ROUTES)


def test_public_resources_are_documented_without_security() -> None:
    paths = document(ROUTES)["paths"]
    for route in ROUTES:
        path, _ = openapi_path(route.template)
        for method in route.resource.operations:
            assert ("security" in paths[path][method]) is route.resource.public
            assert paths[path][method].get("security", []) == []


def test_every_schema_reference_resolves() -> None:
    doc = document(ROUTES)
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc["paths"])))
    assert refs
    assert refs <= set(doc["components"]["schemas"])


@pytest.mark.parametrize(
    ("template", "path", "schemas"),
    [
        ("/api/health", "/api/health", []),
        ("/api/runs/{run_id:uuid}/cancel", "/api/runs/{runId}/cancel", [{"type": "string", "format": "uuid"}]),
        (
            "/api/workflows/{workflow_id:uuid}/versions/{version:int(min=1,max=2147483647)}",
            "/api/workflows/{workflowId}/versions/{version}",
            [{"type": "string", "format": "uuid"}, {"type": "integer", "minimum": 1, "maximum": 2147483647}],
        ),
        ("/api/hooks/{secret}", "/api/hooks/{secret}", [{"type": "string"}]),
    ],
)
def test_falcon_templates_become_openapi_paths(template: str, path: str, schemas: list[dict[str, Any]]) -> None:
    got, params = openapi_path(template)
    assert got == path
    assert [p["schema"] for p in params] == schemas
    assert all(p["in"] == "path" and p["required"] is True for p in params)
    assert [p["name"] for p in params] == re.findall(r"\{(\w+)\}", path)


def test_a_path_parameter_schema_can_be_given_by_the_resource() -> None:
    _, [param] = openapi_path("/api/secrets/{name}", {"name": {"type": "string", "pattern": "^x$"}})
    assert param["schema"] == {"type": "string", "pattern": "^x$"}


def test_an_undocumentable_converter_is_refused() -> None:
    with pytest.raises(ValueError, match="converter"):
        openapi_path("/api/at/{when:dt}")
