"""The OpenAPI 3.1 document, built from the routes the app registers and the models it uses.

Each resource declares its documented operations next to its responders (``operations``: HTTP
method to operation object, written with the helpers here); :func:`document` walks the route
table (``sluice_api.routes``) and turns each Falcon template into a path with its path
parameters. A public resource (``public = True``, no token) gets ``security: []``. Schemas come
from pydantic (``schemas`` and the workflow model of common); each step of a workflow is
described as one of the registered step types with that type's config model, so a step type
added by a plugin shows up here too. A property-based test fuzzes the running API from this
document, and a unit test checks that every responder is documented and every operation has one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic.alias_generators import to_camel
from pydantic.json_schema import models_json_schema

from sluice_api import requestid, schemas
from sluice_api.inputs import RFC3339
from sluice_common.workflow import STEP_ID_PATTERN, WorkflowDefinition, step_types

if TYPE_CHECKING:
    from sluice_api.routes import Route

# What a resource declares: HTTP method (lower case, as in OpenAPI) -> operation object.
Operations = dict[str, dict[str, Any]]
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

REF = "#/components/schemas/{model}"
PROBLEM = "application/problem+json"

_REQUEST_MODELS: list[type[BaseModel]] = [WorkflowDefinition, schemas.RunRequest, schemas.SecretValue]
_RESPONSE_MODELS: list[type[BaseModel]] = [
    schemas.Problem,
    schemas.Workflow,
    schemas.WorkflowPage,
    schemas.WorkflowVersion,
    schemas.WorkflowVersionPage,
    schemas.RunAccepted,
    schemas.Run,
    schemas.RunPage,
    schemas.CancelResult,
    schemas.QueueStatsBody,
    schemas.Secret,
    schemas.SecretList,
    schemas.SchedulePreview,
    schemas.Health,
    schemas.Ready,
]

_REASONS = {
    400: "Malformed request (bad JSON, repeated or malformed parameter)",
    401: "Missing, unknown or revoked token",
    404: "No such object (or it belongs to another user)",
    409: "Conflicts with the object's current state",
    413: "Body larger than the configured limit",
    415: "Unsupported body media type",
    422: "Validation failed; `errors` lists every problem with its JSON path",
    429: "Request limit reached; see Retry-After",
    503: "A backing service is unavailable",
}


def ref(model: type[BaseModel]) -> dict[str, str]:
    """A reference to a model's schema (the model must be in the request or response models above)."""
    return {"$ref": REF.format(model=model.__name__)}


def response(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """A JSON response."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def json_body(schema: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    """A JSON request body."""
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def errors(*codes: int) -> dict[str, Any]:
    """Problem responses for these status codes."""
    out: dict[str, Any] = {}
    for code in codes:
        answer: dict[str, Any] = {
            "description": _REASONS[code],
            "content": {PROBLEM: {"schema": ref(schemas.Problem)}},
        }
        if code == 429:
            answer["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}
        out[str(code)] = answer
    return out


# What every request with a token may get.
AUTH = (401, 429, 503)

UUID_SCHEMA = {"type": "string", "format": "uuid"}
RFC3339_PATTERN = f"^{RFC3339.pattern}$"


def query_param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


PAGE_PARAMS = [
    query_param("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}, "Page size."),
    query_param("cursor", {"type": "string", "maxLength": 400}, "`nextCursor` of the previous page."),
]
IDEMPOTENCY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[\\x20-\\x7e]+$"},
    "description": "The same key for the same workflow returns the run the first request created.",
}
# Every answer carries it (sluice_api.requestid); it is not a documented request parameter because
# an unacceptable one is replaced, not refused.
REQUEST_ID_HEADER = {
    "description": (
        "The request's id, also in every log line written for it: the request's own `X-Request-Id` "
        "when it is 1 to 128 letters, digits or `._:-`, else a generated one."
    ),
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
}
IF_MATCH_HEADER = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": '^(W/)?"[0-9]{1,9}"$'},
    "description": "The version ETag the update applies to; another version answers 409.",
}


# Paths from Falcon templates ---------------------------------------------------------------------

# A template field: {name}, {name:converter} or {name:converter(args)}.
_FIELD = re.compile(r"\{(?P<name>\w+)(?::(?P<converter>\w+)(?:\((?P<args>[^)]*)\))?)?\}")


def _converter_schema(converter: str | None, args: str | None, template: str) -> dict[str, Any]:
    if converter is None:
        return {"type": "string"}
    if converter == "uuid":
        return dict(UUID_SCHEMA)
    if converter == "int":
        schema: dict[str, Any] = {"type": "integer"}
        for arg in filter(None, (a.strip() for a in (args or "").split(","))):
            key, _, value = arg.partition("=")
            if key not in ("min", "max") or not value:
                raise ValueError(f"{template}: document the int converter argument {arg!r}")
            schema["minimum" if key == "min" else "maximum"] = int(value)
        return schema
    raise ValueError(f"{template}: no schema for the Falcon converter {converter!r}")


def openapi_path(template: str, overrides: dict[str, dict[str, Any]] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The OpenAPI path of a Falcon route template and its path parameters.

    ``{workflow_id:uuid}`` becomes ``{workflowId}`` with a uuid schema, ``{version:int(min=1)}`` an
    integer with its bounds, ``{name}`` a string; ``overrides`` (a resource's ``path_params``)
    replaces the schema of a field, e.g. with a pattern the responder checks itself.
    """
    params: list[dict[str, Any]] = []

    def field(match: re.Match[str]) -> str:
        name = match["name"]
        schema = (overrides or {}).get(name) or _converter_schema(match["converter"], match["args"], template)
        params.append({"name": to_camel(name), "in": "path", "required": True, "schema": schema})
        return "{" + to_camel(name) + "}"

    return _FIELD.sub(field, template), params


# The document --------------------------------------------------------------------------------------


def _step_schema() -> dict[str, Any]:
    """Each step is one of the known types, with that type's config."""
    variants = []
    for name, model in sorted(step_types().items()):
        variants.append(
            {
                "type": "object",
                "title": f"{name} step",
                "required": ["id", "type"],
                "additionalProperties": False,
                "properties": {
                    "id": {"type": "string", "pattern": STEP_ID_PATTERN},
                    "type": {"const": name},
                    "config": ref(model),
                },
            }
        )
    return {"oneOf": variants}


def _components() -> dict[str, Any]:
    pairs: list[tuple[type[BaseModel], Any]] = [(m, "validation") for m in _REQUEST_MODELS]
    pairs += [(m, "serialization") for m in _RESPONSE_MODELS]
    pairs += [(m, "validation") for m in step_types().values()]
    _, top = models_json_schema(pairs, by_alias=True, ref_template=REF)
    defs: dict[str, Any] = top["$defs"]
    defs["Step"] = _step_schema()
    return defs


def _with_request_id(operation: dict[str, Any]) -> dict[str, Any]:
    """The operation with the request id header on each of its answers (copied: resources share theirs)."""
    answers = {
        code: {**answer, "headers": {**answer.get("headers", {}), requestid.HEADER: REQUEST_ID_HEADER}}
        for code, answer in operation.get("responses", {}).items()
    }
    return {**operation, "responses": answers}


def _paths(routes: Sequence[Route]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route in routes:
        resource = route.resource
        path, params = openapi_path(route.template, resource.path_params)
        item: dict[str, Any] = {"parameters": params} if params else {}
        for method, operation in resource.operations.items():
            documented = _with_request_id(operation)
            item[method] = {**documented, "security": []} if resource.public else documented
        paths[path] = item
    return paths


@cache
def document(routes: tuple[Route, ...]) -> dict[str, Any]:
    """The document of these routes (the app's are ``sluice_api.routes.ROUTES``)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Sluice",
            "version": "1",
            "description": (
                "Self-hosted workflow runner. Errors are RFC 9457 problem details. Every answer carries an "
                "`X-Request-Id` (the request's own when acceptable) that the API's log lines for it name too."
            ),
        },
        "security": [{"bearer": []}],
        "paths": _paths(routes),
        "components": {
            "schemas": _components(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
