"""Runs: queue a run of a workflow, read one, list them, cancel and retry."""

from __future__ import annotations

from typing import Any, ClassVar
from uuid import UUID

import falcon

from sluice_api import commands, queries, schemas
from sluice_api.auth import caller_of
from sluice_api.inputs import choice_param, query, read_json, time_param, uuid_param, validate
from sluice_api.openapi import (
    AUTH,
    IDEMPOTENCY_HEADER,
    PAGE_PARAMS,
    RFC3339_PATTERN,
    UUID_SCHEMA,
    Operations,
    errors,
    json_body,
    query_param,
    ref,
    response,
)
from sluice_api.resources.base import Resource, accepted, dump, idempotency_key, page, page_params, traceparent
from sluice_common.runs import cancel_run


class RunWorkflowResource(Resource):
    """``POST /api/workflows/{id}/run``: the seeds' run endpoint."""

    operations: ClassVar[Operations] = {
        "post": {
            "operationId": "runWorkflow",
            "summary": "Queue a run (the seeds' endpoint)",
            "parameters": [IDEMPOTENCY_HEADER],
            "requestBody": json_body(ref(schemas.RunRequest), required=False),
            "responses": {
                "202": response(ref(schemas.RunAccepted), "Queued"),
                **errors(400, *AUTH, 404, 409, 413, 415, 422),
            },
        },
    }

    def on_post(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        caller = caller_of(req)
        body = validate(schemas.RunRequest, read_json(req, self._deps.settings.api_max_body_bytes, required=False))
        run = commands.run_workflow(
            self._deps,
            caller.user_id,
            workflow_id,
            trigger_data=body.trigger_data,
            priority=body.priority,
            delay_ms=body.delay,
            idempotency_key=idempotency_key(req),
            traceparent=traceparent(req),
        )
        accepted(resp, run.run_id, run.status)


def run_view(row: dict[str, Any]) -> Any:
    return dump(schemas.Run.model_validate(row))


class RunResource(Resource):
    """``GET /api/runs/{id}``: the run, its attempts and its steps."""

    query_params = frozenset({"include"})
    operations: ClassVar[Operations] = {
        "get": {
            "operationId": "getRun",
            "parameters": [
                query_param(
                    "include", {"enum": ["definition"]}, "`definition`: add the workflow version the run executes."
                )
            ],
            "responses": {
                "200": response(ref(schemas.Run), "The run and its steps"),
                **errors(400, *AUTH, 404, 422),
            },
        },
    }

    def on_get(self, req: falcon.Request, resp: falcon.Response, run_id: UUID) -> None:
        include = choice_param(query(req), "include", ("definition",))
        run = queries.get_run(self._deps.pool, caller_of(req).user_id, run_id, with_definition=include == "definition")
        resp.media = run_view(run)


def _run_filters(*, with_workflow: bool) -> list[dict[str, Any]]:
    statuses = list(schemas.RUN_STATUSES)
    params = [
        *PAGE_PARAMS,
        query_param("status", {"enum": statuses}, "Only runs in this status."),
        query_param("since", {"type": "string", "pattern": RFC3339_PATTERN}, "Queued at or after (RFC 3339)."),
        query_param("until", {"type": "string", "pattern": RFC3339_PATTERN}, "Queued before (RFC 3339)."),
    ]
    if with_workflow:
        params.append(query_param("workflowId", UUID_SCHEMA, "Only runs of this workflow."))
    return params


class RunsResource(Resource):
    """``GET /api/runs``: the caller's runs, newest first."""

    query_params = frozenset({"limit", "cursor", "status", "since", "until", "workflowId"})
    operations: ClassVar[Operations] = {
        "get": {
            "operationId": "listRuns",
            "parameters": _run_filters(with_workflow=True),
            "responses": {"200": response(ref(schemas.RunPage), "A page"), **errors(400, *AUTH, 422)},
        },
    }

    def on_get(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID | None = None) -> None:
        caller = caller_of(req)
        params = query(req)
        if workflow_id is not None:
            queries.get_workflow(self._deps.pool, caller.user_id, workflow_id)  # 404 for others' workflows
        else:
            workflow_id = uuid_param(params, "workflowId")
        limit, after = page_params(params)
        rows = queries.list_runs(
            self._deps.pool,
            caller.user_id,
            limit=limit,
            after=after,
            workflow_id=workflow_id,
            status=choice_param(params, "status", schemas.RUN_STATUSES),
            since=time_param(params, "since"),
            until=time_param(params, "until"),
        )
        rows, cursor = page(rows, limit, "queued_at")
        resp.media = {
            "items": [dump(schemas.RunSummary.model_validate(r)) for r in rows],
            "nextCursor": cursor,
        }


class WorkflowRunsResource(RunsResource):
    """``GET /api/workflows/{id}/runs``: the runs of one workflow (no ``workflowId`` filter)."""

    query_params = RunsResource.query_params - {"workflowId"}
    operations: ClassVar[Operations] = {
        "get": {
            "operationId": "listWorkflowRuns",
            "parameters": _run_filters(with_workflow=False),
            "responses": {"200": response(ref(schemas.RunPage), "A page"), **errors(400, *AUTH, 404, 422)},
        },
    }


class CancelRunResource(Resource):
    """``POST /api/runs/{id}/cancel``."""

    operations: ClassVar[Operations] = {
        "post": {
            "operationId": "cancelRun",
            "summary": "Cancel: a queued or delayed run never starts; a running one stops at its next step",
            "responses": {"200": response(ref(schemas.CancelResult), "Done"), **errors(*AUTH, 404, 409)},
        },
    }

    def on_post(self, req: falcon.Request, resp: falcon.Response, run_id: UUID) -> None:
        status = cancel_run(self._deps.pool, run_id, caller_of(req).user_id)
        resp.media = {"id": str(run_id), "status": status, "cancelRequested": status == "running"}


class RetryRunResource(Resource):
    """``POST /api/runs/{id}/retry``."""

    operations: ClassVar[Operations] = {
        "post": {
            "operationId": "retryRun",
            "summary": "Queue a failed run again for a new series of attempts",
            "responses": {"202": response(ref(schemas.RunAccepted), "Queued"), **errors(*AUTH, 404, 409)},
        },
    }

    def on_post(self, req: falcon.Request, resp: falcon.Response, run_id: UUID) -> None:
        status = queries.retry_run(
            self._deps.pool, self._deps.broker, self._deps.settings, caller_of(req).user_id, run_id
        )
        accepted(resp, run_id, status)
        resp.media["message"] = "Run queued again for execution"
