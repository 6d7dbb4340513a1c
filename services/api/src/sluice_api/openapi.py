"""The OpenAPI 3.1 document, built from the models that validate requests and shape responses.

Schemas come from pydantic (``schemas`` and the workflow model of common); each step of a
workflow is described as one of the registered step types with that type's config model, so a
step type added by a plugin shows up here too. A property-based test fuzzes the running API from
this document.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from sluice_api import schemas
from sluice_api.inputs import RFC3339
from sluice_common.cron import PREVIEW_MAX
from sluice_common.secrets import SECRET_NAME_PATTERN as SECRET_NAME
from sluice_common.workflow import STEP_ID_PATTERN, WorkflowDefinition, step_types

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


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code in codes:
        response: dict[str, Any] = {
            "description": _REASONS[code],
            "content": {PROBLEM: {"schema": _ref(schemas.Problem)}},
        }
        if code == 429:
            response["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}
        out[str(code)] = response
    return out


AUTH = (401, 429, 503)

_UUID = {"type": "string", "format": "uuid"}
_RFC3339 = f"^{RFC3339.pattern}$"


def _path_id(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _UUID}


def _q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_PAGE = [
    _q("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}, "Page size."),
    _q("cursor", {"type": "string", "maxLength": 400}, "`nextCursor` of the previous page."),
]
_IDEMPOTENCY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[\\x20-\\x7e]+$"},
    "description": "The same key for the same workflow returns the run the first request created.",
}
_IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": '^(W/)?"[0-9]{1,9}"$'},
    "description": "The version ETag the update applies to; another version answers 409.",
}


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
                    "config": _ref(model),
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


def _workflow_ops() -> dict[str, Any]:
    wf_body = {"required": True, "content": {"application/json": {"schema": _ref(WorkflowDefinition)}}}
    one = {"parameters": [_path_id("workflowId")]}
    return {
        "/api/workflows": {
            "post": {
                "operationId": "createWorkflow",
                "summary": "Create a workflow (a webhook workflow's secret URL is shown here only)",
                "requestBody": wf_body,
                "responses": {
                    "201": _json(_ref(schemas.Workflow), "Created"),
                    **_errors(400, *AUTH, 413, 415, 422),
                },
            },
            "get": {
                "operationId": "listWorkflows",
                "summary": "List your workflows, newest first",
                "parameters": [
                    *_PAGE,
                    _q("status", {"enum": ["active", "paused"]}, "Only workflows in this status."),
                    _q("triggerType", {"enum": ["manual", "cron", "webhook"]}, "Only this trigger type."),
                ],
                "responses": {"200": _json(_ref(schemas.WorkflowPage), "A page"), **_errors(400, *AUTH, 422)},
            },
        },
        "/api/workflows/{workflowId}": {
            **one,
            "get": {
                "operationId": "getWorkflow",
                "responses": {"200": _json(_ref(schemas.Workflow), "The workflow"), **_errors(*AUTH, 404)},
            },
            "put": {
                "operationId": "replaceWorkflow",
                "summary": "Replace the definition (bumps the version; the scheduler picks it up)",
                "parameters": [_IF_MATCH],
                "requestBody": wf_body,
                "responses": {
                    "200": _json(_ref(schemas.Workflow), "Updated"),
                    **_errors(400, *AUTH, 404, 409, 413, 415, 422),
                },
            },
            "patch": {
                "operationId": "patchWorkflow",
                "summary": "Change part of the definition with a JSON merge patch (RFC 7396)",
                "parameters": [_IF_MATCH],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/merge-patch+json": {"schema": {"type": "object"}},
                        "application/json": {"schema": {"type": "object"}},
                    },
                },
                "responses": {
                    "200": _json(_ref(schemas.Workflow), "Updated"),
                    **_errors(400, *AUTH, 404, 409, 413, 415, 422),
                },
            },
            "delete": {
                "operationId": "deleteWorkflow",
                "summary": "Delete the workflow and cancel its unfinished runs",
                "responses": {"204": {"description": "Deleted"}, **_errors(*AUTH, 404)},
            },
        },
        "/api/workflows/{workflowId}/run": {
            **one,
            "post": {
                "operationId": "runWorkflow",
                "summary": "Queue a run (the seeds' endpoint)",
                "parameters": [_IDEMPOTENCY],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref(schemas.RunRequest)}},
                },
                "responses": {
                    "202": _json(_ref(schemas.RunAccepted), "Queued"),
                    **_errors(400, *AUTH, 404, 409, 413, 415, 422),
                },
            },
        },
        "/api/workflows/{workflowId}/webhook/rotate": {
            **one,
            "post": {
                "operationId": "rotateWebhook",
                "summary": "Replace the webhook secret; the old URL stops working at once",
                "responses": {"200": _json(_ref(schemas.Workflow), "The new URL"), **_errors(*AUTH, 404, 409)},
            },
        },
        "/api/workflows/{workflowId}/schedule": {
            **one,
            "get": {
                "operationId": "getSchedule",
                "summary": "A cron workflow's next fire times, last fire and missed fires",
                "parameters": [_q("count", {"type": "integer", "minimum": 1, "maximum": PREVIEW_MAX}, "Fire times.")],
                "responses": {
                    "200": _json(_ref(schemas.SchedulePreview), "The schedule"),
                    **_errors(400, *AUTH, 404, 409, 422),
                },
            },
        },
        "/api/workflows/{workflowId}/versions": {
            **one,
            "get": {
                "operationId": "listWorkflowVersions",
                "summary": "Every saved version of the workflow, newest first",
                "parameters": _PAGE,
                "responses": {
                    "200": _json(_ref(schemas.WorkflowVersionPage), "A page"),
                    **_errors(400, *AUTH, 404, 422),
                },
            },
        },
        "/api/workflows/{workflowId}/versions/{version}": {
            "parameters": [
                _path_id("workflowId"),
                {
                    "name": "version",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 2147483647},
                },
            ],
            "get": {
                "operationId": "getWorkflowVersion",
                "summary": "One version; restore it by sending its body to PUT /api/workflows/{workflowId}",
                "responses": {"200": _json(_ref(schemas.WorkflowVersion), "The version"), **_errors(*AUTH, 404)},
            },
        },
        "/api/workflows/{workflowId}/runs": {
            **one,
            "get": {
                "operationId": "listWorkflowRuns",
                "parameters": _run_filters(with_workflow=False),
                "responses": {"200": _json(_ref(schemas.RunPage), "A page"), **_errors(400, *AUTH, 404, 422)},
            },
        },
    }


def _run_filters(*, with_workflow: bool) -> list[dict[str, Any]]:
    statuses = list(schemas.RUN_STATUSES)
    params = [
        *_PAGE,
        _q("status", {"enum": statuses}, "Only runs in this status."),
        _q("since", {"type": "string", "pattern": _RFC3339}, "Queued at or after (RFC 3339)."),
        _q("until", {"type": "string", "pattern": _RFC3339}, "Queued before (RFC 3339)."),
    ]
    if with_workflow:
        params.append(_q("workflowId", _UUID, "Only runs of this workflow."))
    return params


def _run_ops() -> dict[str, Any]:
    one = {"parameters": [_path_id("runId")]}
    return {
        "/api/runs": {
            "get": {
                "operationId": "listRuns",
                "parameters": _run_filters(with_workflow=True),
                "responses": {"200": _json(_ref(schemas.RunPage), "A page"), **_errors(400, *AUTH, 422)},
            },
        },
        "/api/runs/{runId}": {
            **one,
            "get": {
                "operationId": "getRun",
                "parameters": [
                    _q("include", {"enum": ["definition"]}, "`definition`: add the workflow version the run executes.")
                ],
                "responses": {
                    "200": _json(_ref(schemas.Run), "The run and its steps"),
                    **_errors(400, *AUTH, 404, 422),
                },
            },
        },
        "/api/runs/{runId}/cancel": {
            **one,
            "post": {
                "operationId": "cancelRun",
                "summary": "Cancel: a queued or delayed run never starts; a running one stops at its next step",
                "responses": {"200": _json(_ref(schemas.CancelResult), "Done"), **_errors(*AUTH, 404, 409)},
            },
        },
        "/api/runs/{runId}/retry": {
            **one,
            "post": {
                "operationId": "retryRun",
                "summary": "Queue a failed run again for a new series of attempts",
                "responses": {"202": _json(_ref(schemas.RunAccepted), "Queued"), **_errors(*AUTH, 404, 409)},
            },
        },
    }


def _other_ops() -> dict[str, Any]:
    public: list[Any] = []
    return {
        "/api/hooks/{secret}": {
            "post": {
                "operationId": "webhook",
                "summary": "Trigger a webhook workflow; the body (JSON, form or text) becomes its trigger data",
                "security": public,
                "parameters": [
                    {"name": "secret", "in": "path", "required": True, "schema": {"type": "string"}},
                    _IDEMPOTENCY,
                ],
                "requestBody": {"required": False, "content": {"application/json": {"schema": {}}}},
                "responses": {
                    "202": _json(_ref(schemas.RunAccepted), "Queued"),
                    **_errors(400, 404, 409, 413, 415, 422, 429, 503),
                },
            },
        },
        "/api/workflows/queue/stats": {
            "get": {
                "operationId": "queueStats",
                "summary": "Queue statistics in the seeds' shape (aggregate counts; no token needed)",
                "security": public,
                "responses": {"200": _json(_ref(schemas.QueueStatsBody), "Statistics"), **_errors(503)},
            },
        },
        "/api/scheduler/refresh": {
            "post": {
                "operationId": "refreshScheduler",
                "summary": "Ask the scheduler to reload every cron trigger",
                "responses": {
                    "202": _json({"type": "object"}, "Requested"),
                    **_errors(*AUTH, 503),
                },
            },
        },
        "/api/secrets": {
            "get": {
                "operationId": "listSecrets",
                "summary": "Your secrets' names (values are never returned)",
                "responses": {"200": _json(_ref(schemas.SecretList), "Names and times"), **_errors(*AUTH)},
            },
        },
        "/api/secrets/{name}": {
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "pattern": SECRET_NAME}}
            ],
            "put": {
                "operationId": "putSecret",
                "summary": "Create or replace a secret (stored encrypted; steps use it as {{ secrets.NAME }})",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(schemas.SecretValue)}},
                },
                "responses": {
                    "200": _json(_ref(schemas.Secret), "Stored"),
                    **_errors(400, *AUTH, 413, 415, 422),
                },
            },
            "delete": {
                "operationId": "deleteSecret",
                "responses": {"204": {"description": "Deleted"}, **_errors(*AUTH, 404, 422)},
            },
        },
        "/api/health": {
            "get": {
                "operationId": "health",
                "security": public,
                "responses": {"200": _json(_ref(schemas.Health), "The process answers")},
            },
        },
        "/api/ready": {
            "get": {
                "operationId": "ready",
                "security": public,
                "responses": {
                    "200": _json(_ref(schemas.Ready), "PostgreSQL and Redis answer"),
                    "503": _json(_ref(schemas.Ready), "A backing service does not answer"),
                },
            },
        },
        "/api/openapi.json": {
            "get": {
                "operationId": "openapi",
                "security": public,
                "responses": {"200": _json({"type": "object"}, "This document")},
            },
        },
    }


@cache
def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Sluice",
            "version": "1",
            "description": "Self-hosted workflow runner. Errors are RFC 9457 problem details.",
        },
        "security": [{"bearer": []}],
        "paths": {**_workflow_ops(), **_run_ops(), **_other_ops()},
        "components": {
            "schemas": _components(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


class OpenApiResource:
    public = True

    def on_get(self, req: Any, resp: Any) -> None:
        resp.media = document()
