"""Workflows: create, list, read, replace, patch and delete; their versions, webhook and schedule."""

from __future__ import annotations

from typing import Any, ClassVar
from uuid import UUID

import falcon

from sluice_api import commands, queries, schemas
from sluice_api.auth import caller_of
from sluice_api.deps import Dependencies
from sluice_api.inputs import (
    choice_param,
    decode_version_cursor,
    encode_version_cursor,
    int_param,
    query,
    read_json,
)
from sluice_api.openapi import (
    AUTH,
    IF_MATCH_HEADER,
    PAGE_PARAMS,
    Operations,
    errors,
    json_body,
    query_param,
    ref,
    response,
)
from sluice_api.resources.base import PAGE_DEFAULT, Resource, dump, page, page_params
from sluice_common.cron import PREVIEW_MAX, ScheduleSummary, schedule_preview
from sluice_common.errors import FieldProblem, ValidationFailed
from sluice_common.workflow import WorkflowDefinition

_DEFINITION = json_body(ref(WorkflowDefinition))


def workflow_view(req: falcon.Request, deps: Dependencies, row: dict[str, Any], secret: str | None = None) -> Any:
    webhook = None
    if row["trigger_type"] == "webhook":
        url = None if secret is None else commands.webhook_url(deps, req.prefix, secret)
        webhook = schemas.Webhook(enabled=bool(row["has_webhook"]), url=url)
    return dump(schemas.Workflow.model_validate({**row, "webhook": webhook}))


class WorkflowsResource(Resource):
    """``POST|GET /api/workflows``."""

    query_params = frozenset({"limit", "cursor", "status", "triggerType"})
    operations: ClassVar[Operations] = {
        "post": {
            "operationId": "createWorkflow",
            "summary": "Create a workflow (a webhook workflow's secret URL is shown here only)",
            "requestBody": _DEFINITION,
            "responses": {
                "201": response(ref(schemas.Workflow), "Created"),
                **errors(400, *AUTH, 413, 415, 422),
            },
        },
        "get": {
            "operationId": "listWorkflows",
            "summary": "List your workflows, newest first",
            "parameters": [
                *PAGE_PARAMS,
                query_param("status", {"enum": ["active", "paused"]}, "Only workflows in this status."),
                query_param("triggerType", {"enum": ["manual", "cron", "webhook"]}, "Only this trigger type."),
            ],
            "responses": {"200": response(ref(schemas.WorkflowPage), "A page"), **errors(400, *AUTH, 422)},
        },
    }

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = caller_of(req)
        saved = commands.create_workflow(
            self._deps, caller.user_id, read_json(req, self._deps.settings.api_max_body_bytes)
        )
        resp.status = falcon.HTTP_201
        resp.location = f"/api/workflows/{saved.row['id']}"
        resp.media = workflow_view(req, self._deps, saved.row, saved.secret)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = caller_of(req)
        params = query(req)
        limit, after = page_params(params)
        rows = queries.list_workflows(
            self._deps.pool,
            caller.user_id,
            limit=limit,
            after=after,
            status=choice_param(params, "status", ("active", "paused")),
            trigger_type=choice_param(params, "triggerType", ("manual", "cron", "webhook")),
        )
        rows, cursor = page(rows, limit, "created_at")
        resp.media = {"items": [workflow_view(req, self._deps, r) for r in rows], "nextCursor": cursor}


def _expected_version(req: falcon.Request) -> int | None:
    """``If-Match: "<version>"`` guards an update against a concurrent one."""
    header = req.get_header("If-Match")
    if header is None or header.strip() == "*":
        return None
    tag = header.strip().removeprefix("W/").strip('"')
    if not tag.isdigit() or len(tag) > 9:
        raise ValidationFailed([FieldProblem("header.If-Match", 'must be a version ETag such as "3"')])
    return int(tag)


class WorkflowResource(Resource):
    """``GET|PUT|PATCH|DELETE /api/workflows/{id}``."""

    operations: ClassVar[Operations] = {
        "get": {
            "operationId": "getWorkflow",
            "responses": {"200": response(ref(schemas.Workflow), "The workflow"), **errors(*AUTH, 404)},
        },
        "put": {
            "operationId": "replaceWorkflow",
            "summary": "Replace the definition (bumps the version; the scheduler picks it up)",
            "parameters": [IF_MATCH_HEADER],
            "requestBody": _DEFINITION,
            "responses": {
                "200": response(ref(schemas.Workflow), "Updated"),
                **errors(400, *AUTH, 404, 409, 413, 415, 422),
            },
        },
        "patch": {
            "operationId": "patchWorkflow",
            "summary": "Change part of the definition with a JSON merge patch (RFC 7396)",
            "parameters": [IF_MATCH_HEADER],
            "requestBody": {
                "required": True,
                "content": {
                    "application/merge-patch+json": {"schema": {"type": "object"}},
                    "application/json": {"schema": {"type": "object"}},
                },
            },
            "responses": {
                "200": response(ref(schemas.Workflow), "Updated"),
                **errors(400, *AUTH, 404, 409, 413, 415, 422),
            },
        },
        "delete": {
            "operationId": "deleteWorkflow",
            "summary": "Delete the workflow and cancel its unfinished runs",
            "responses": {"204": {"description": "Deleted"}, **errors(*AUTH, 404)},
        },
    }

    def on_get(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        row = queries.get_workflow(self._deps.pool, caller_of(req).user_id, workflow_id)
        resp.etag = f'"{row["version"]}"'
        resp.media = workflow_view(req, self._deps, row)

    def _answer(self, req: falcon.Request, resp: falcon.Response, saved: commands.Saved) -> None:
        resp.etag = f'"{saved.row["version"]}"'
        resp.media = workflow_view(req, self._deps, saved.row, saved.secret)

    def on_put(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        data = read_json(req, self._deps.settings.api_max_body_bytes)
        saved = commands.replace_workflow(self._deps, caller_of(req).user_id, workflow_id, data, _expected_version(req))
        self._answer(req, resp, saved)

    def on_patch(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        patch = read_json(req, self._deps.settings.api_max_body_bytes)
        if not isinstance(patch, dict):
            raise ValidationFailed([FieldProblem("$", "a merge patch must be a JSON object")])
        saved = commands.patch_workflow(self._deps, caller_of(req).user_id, workflow_id, patch, _expected_version(req))
        self._answer(req, resp, saved)

    def on_delete(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        commands.delete_workflow(self._deps, caller_of(req).user_id, workflow_id)
        resp.status = falcon.HTTP_204


class WorkflowVersionsResource(Resource):
    """``GET /api/workflows/{id}/versions``: every saved version, newest first."""

    query_params = frozenset({"limit", "cursor"})
    operations: ClassVar[Operations] = {
        "get": {
            "operationId": "listWorkflowVersions",
            "summary": "Every saved version of the workflow, newest first",
            "parameters": PAGE_PARAMS,
            "responses": {
                "200": response(ref(schemas.WorkflowVersionPage), "A page"),
                **errors(400, *AUTH, 404, 422),
            },
        },
    }

    def on_get(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        owner = caller_of(req).user_id
        params = query(req)
        limit = int_param(params, "limit", PAGE_DEFAULT, 1, queries.PAGE_MAX)
        before = decode_version_cursor(params)
        queries.get_workflow(self._deps.pool, owner, workflow_id)  # 404 for others' and deleted workflows
        rows = queries.list_versions(self._deps.pool, owner, workflow_id, limit=limit, before=before)
        cursor = encode_version_cursor(rows[limit - 1]["version"]) if len(rows) > limit else None
        resp.media = dump(schemas.WorkflowVersionPage.model_validate({"items": rows[:limit], "next_cursor": cursor}))


class WorkflowVersionResource(Resource):
    """``GET /api/workflows/{id}/versions/{n}``; restoring it is a ``PUT`` of its body."""

    operations: ClassVar[Operations] = {
        "get": {
            "operationId": "getWorkflowVersion",
            "summary": "One version; restore it by sending its body to PUT /api/workflows/{workflowId}",
            "responses": {"200": response(ref(schemas.WorkflowVersion), "The version"), **errors(*AUTH, 404)},
        },
    }

    def on_get(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID, version: int) -> None:
        row = queries.get_version(self._deps.pool, caller_of(req).user_id, workflow_id, version)
        resp.etag = f'"{row["version"]}"'
        resp.media = dump(schemas.WorkflowVersion.model_validate(row))


class WebhookRotateResource(Resource):
    """``POST /api/workflows/{id}/webhook/rotate``."""

    operations: ClassVar[Operations] = {
        "post": {
            "operationId": "rotateWebhook",
            "summary": "Replace the webhook secret; the old URL stops working at once",
            "responses": {"200": response(ref(schemas.Workflow), "The new URL"), **errors(*AUTH, 404, 409)},
        },
    }

    def on_post(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        row, secret = queries.rotate_webhook(self._deps.pool, caller_of(req).user_id, workflow_id)
        resp.media = workflow_view(req, self._deps, row, secret)


def schedule_body(summary: ScheduleSummary) -> dict[str, Any]:
    """The ``GET /api/workflows/{id}/schedule`` body (times in UTC with a ``Z``)."""
    return dump(schemas.SchedulePreview.model_validate(summary, from_attributes=True))


class ScheduleResource(Resource):
    """``GET /api/workflows/{id}/schedule``: the next fire times, the last fire and missed fires."""

    query_params = frozenset({"count"})
    operations: ClassVar[Operations] = {
        "get": {
            "operationId": "getSchedule",
            "summary": "A cron workflow's next fire times, last fire and missed fires",
            "parameters": [
                query_param("count", {"type": "integer", "minimum": 1, "maximum": PREVIEW_MAX}, "Fire times.")
            ],
            "responses": {
                "200": response(ref(schemas.SchedulePreview), "The schedule"),
                **errors(400, *AUTH, 404, 409, 422),
            },
        },
    }

    def on_get(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        count = int_param(query(req), "count", 5, 1, PREVIEW_MAX)
        summary = schedule_preview(self._deps.pool, str(workflow_id), str(caller_of(req).user_id), count)
        resp.media = schedule_body(summary)
