"""The API's resources: workflows, runs, webhooks, queue stats and the scheduler refresh.

Handlers read and check input (``inputs``), call the store or the run pipeline of common, and
answer in camelCase JSON shaped by ``schemas``. Errors are raised as the exception tree of common
and turned into problems in one place (``problems``).
"""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import parse_qsl
from uuid import UUID

import falcon
import redis

from sluice_api import queries, schemas
from sluice_api.auth import RequestLimiter, caller_of, too_many
from sluice_api.deps import Dependencies
from sluice_api.inputs import (
    check_storable,
    choice_param,
    decode_cursor,
    decode_version_cursor,
    encode_cursor,
    encode_version_cursor,
    int_param,
    media_type,
    parse_json,
    query,
    read_body,
    read_json,
    time_param,
    uuid_param,
    validate,
)
from sluice_common import secrets
from sluice_common.cron import PREVIEW_MAX, schedule_preview
from sluice_common.errors import ConflictError, FieldProblem, InfrastructureError, ValidationFailed
from sluice_common.runs import cancel_run, enqueue_run, get_queue_stats, seeds_stats_body
from sluice_common.workflow import validate_workflow

PAGE_DEFAULT = 50
IDEMPOTENCY_KEY_MAX = 200


def _dump(model: Any) -> dict[str, Any]:
    out: dict[str, Any] = model.model_dump(by_alias=True, mode="json")
    return out


def workflow_view(req: falcon.Request, deps: Dependencies, row: dict[str, Any], secret: str | None = None) -> Any:
    webhook = None
    if row["trigger_type"] == "webhook":
        url = None
        if secret is not None:
            base = deps.settings.public_url.rstrip("/") if deps.settings.public_url else req.prefix
            url = f"{base}/api/hooks/{secret}"
        webhook = schemas.Webhook(enabled=bool(row["has_webhook"]), url=url)
    return _dump(schemas.Workflow.model_validate({**row, "webhook": webhook}))


def _notify(deps: Dependencies, *rows: dict[str, Any]) -> None:
    """Tell the scheduler about a change that involves a cron trigger (before or after)."""
    if deps.scheduler is not None and any(r["trigger_type"] == "cron" for r in rows):
        deps.scheduler.trigger_changed(str(rows[0]["id"]))


def _page_params(params: dict[str, str]) -> tuple[int, Any]:
    return int_param(params, "limit", PAGE_DEFAULT, 1, queries.PAGE_MAX), decode_cursor(params)


def _page(rows: list[dict[str, Any]], limit: int, at: str) -> tuple[list[dict[str, Any]], str | None]:
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1][at], rows[-1]["id"])


class WorkflowsResource:
    query_params = frozenset({"limit", "cursor", "status", "triggerType"})

    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = caller_of(req)
        definition = validate_workflow(read_json(req, self._deps.settings.api_max_body_bytes))
        row, secret = queries.create_workflow(self._deps.pool, caller.user_id, definition)
        _notify(self._deps, row)
        resp.status = falcon.HTTP_201
        resp.location = f"/api/workflows/{row['id']}"
        resp.media = workflow_view(req, self._deps, row, secret)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller = caller_of(req)
        params = query(req)
        limit, after = _page_params(params)
        rows = queries.list_workflows(
            self._deps.pool,
            caller.user_id,
            limit=limit,
            after=after,
            status=choice_param(params, "status", ("active", "paused")),
            trigger_type=choice_param(params, "triggerType", ("manual", "cron", "webhook")),
        )
        rows, cursor = _page(rows, limit, "created_at")
        resp.media = {"items": [workflow_view(req, self._deps, r) for r in rows], "nextCursor": cursor}


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _expected_version(req: falcon.Request) -> int | None:
    """``If-Match: "<version>"`` guards an update against a concurrent one."""
    header = req.get_header("If-Match")
    if header is None or header.strip() == "*":
        return None
    tag = header.strip().removeprefix("W/").strip('"')
    if not tag.isdigit() or len(tag) > 9:
        raise ValidationFailed([FieldProblem("header.If-Match", 'must be a version ETag such as "3"')])
    return int(tag)


class WorkflowResource:
    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        row = queries.get_workflow(self._deps.pool, caller_of(req).user_id, workflow_id)
        resp.etag = f'"{row["version"]}"'
        resp.media = workflow_view(req, self._deps, row)

    def _replace(
        self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID, data: Any, version: int | None
    ) -> None:
        definition = validate_workflow(data)
        old, row, secret = queries.update_workflow(
            self._deps.pool, caller_of(req).user_id, workflow_id, definition, expected_version=version
        )
        _notify(self._deps, row, old)
        resp.etag = f'"{row["version"]}"'
        resp.media = workflow_view(req, self._deps, row, secret)

    def on_put(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        data = read_json(req, self._deps.settings.api_max_body_bytes)
        self._replace(req, resp, workflow_id, data, _expected_version(req))

    def on_patch(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        patch = read_json(req, self._deps.settings.api_max_body_bytes)
        if not isinstance(patch, dict):
            raise ValidationFailed([FieldProblem("$", "a merge patch must be a JSON object")])
        expected = _expected_version(req)
        for tries_left in range(4, -1, -1):
            current = queries.get_workflow(self._deps.pool, caller_of(req).user_id, workflow_id)
            if expected is not None and current["version"] != expected:
                raise ConflictError(
                    f"the workflow is at version {current['version']}, not {expected}; fetch it and try again"
                )
            try:
                # Applied to the version read just now: a concurrent update in between is not
                # overwritten but makes this patch apply again to the newer version.
                self._replace(
                    req, resp, workflow_id, _merge_patch(queries.definition_of(current), patch), current["version"]
                )
                return
            except ConflictError:
                if expected is not None or tries_left == 0:
                    raise

    def on_delete(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        row = queries.delete_workflow(self._deps.pool, caller_of(req).user_id, workflow_id)
        _notify(self._deps, row)
        resp.status = falcon.HTTP_204


class WorkflowVersionsResource:
    """``GET /api/workflows/{id}/versions``: every saved version, newest first."""

    query_params = frozenset({"limit", "cursor"})

    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        owner = caller_of(req).user_id
        params = query(req)
        limit = int_param(params, "limit", PAGE_DEFAULT, 1, queries.PAGE_MAX)
        before = decode_version_cursor(params)
        queries.get_workflow(self._deps.pool, owner, workflow_id)  # 404 for others' and deleted workflows
        rows = queries.list_versions(self._deps.pool, owner, workflow_id, limit=limit, before=before)
        cursor = encode_version_cursor(rows[limit - 1]["version"]) if len(rows) > limit else None
        resp.media = _dump(schemas.WorkflowVersionPage.model_validate({"items": rows[:limit], "next_cursor": cursor}))


class WorkflowVersionResource:
    """``GET /api/workflows/{id}/versions/{n}``; restoring it is a ``PUT`` of its body."""

    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID, version: int) -> None:
        row = queries.get_version(self._deps.pool, caller_of(req).user_id, workflow_id, version)
        resp.etag = f'"{row["version"]}"'
        resp.media = _dump(schemas.WorkflowVersion.model_validate(row))


class WebhookRotateResource:
    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    def on_post(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        row, secret = queries.rotate_webhook(self._deps.pool, caller_of(req).user_id, workflow_id)
        resp.media = workflow_view(req, self._deps, row, secret)


def _idempotency_key(req: falcon.Request) -> str | None:
    key = req.get_header("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not (key.isascii() and key.isprintable()):
        raise ValidationFailed(
            [FieldProblem("header.Idempotency-Key", f"must be 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters")]
        )
    return key


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def _traceparent(req: falcon.Request) -> str | None:
    """The caller's W3C trace context, carried to the worker; anything malformed is dropped."""
    value = req.get_header("traceparent")
    return value if value is not None and _TRACEPARENT.fullmatch(value.strip().lower()) else None


def _accepted(resp: falcon.Response, run_id: UUID, status: str) -> None:
    resp.status = falcon.HTTP_202
    resp.location = f"/api/runs/{run_id}"
    resp.media = {
        "success": True,
        "queued": True,
        "jobId": str(run_id),
        "runId": str(run_id),
        "message": "Workflow queued for execution",
        "status": status,
    }


class RunWorkflowResource:
    """``POST /api/workflows/{id}/run``: the seeds' run endpoint."""

    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    def on_post(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        caller = caller_of(req)
        body = validate(schemas.RunRequest, read_json(req, self._deps.settings.api_max_body_bytes, required=False))
        run = enqueue_run(
            self._deps.pool,
            self._deps.broker,
            self._deps.settings,
            workflow_id=workflow_id,
            owner_id=caller.user_id,
            trigger_type="manual",
            trigger_data=body.trigger_data,
            priority=body.priority,
            delay_ms=body.delay,
            idempotency_key=_idempotency_key(req),
            traceparent=_traceparent(req),
            sender=self._deps.sender,
        )
        _accepted(resp, run.run_id, run.status)


def _webhook_data(req: falcon.Request, limit: int) -> Any:
    data = read_body(req, limit)
    if not data.strip():
        return {}
    kind = media_type(req)
    if kind in ("", "application/json") or kind.endswith("+json"):
        return parse_json(data)
    if kind == "application/x-www-form-urlencoded":
        try:
            form: Any = dict(parse_qsl(data.decode(), keep_blank_values=True))
        except UnicodeDecodeError:
            raise falcon.HTTPBadRequest(title="Bad Request", description="the form is not UTF-8") from None
        check_storable(form)
        return form
    if kind.startswith("text/"):
        text = {"text": data.decode(errors="replace")}
        check_storable(text)
        return text
    raise falcon.HTTPUnsupportedMediaType(
        title="Unsupported Media Type",
        description=f"send JSON, a form or text, not {kind}",
    )


class HookResource:
    """``POST /api/hooks/{secret}``: the secret is the credential; its body becomes trigger data."""

    public = True

    def __init__(self, deps: Dependencies, limiter: RequestLimiter) -> None:
        self._deps = deps
        self._limiter = limiter

    def on_post(self, req: falcon.Request, resp: falcon.Response, secret: str) -> None:
        workflow_id, owner = queries.webhook_target(self._deps.pool, secret)
        wait = self._limiter.hit(f"hook:{workflow_id}")
        if wait is not None:
            raise too_many(wait)
        data = _webhook_data(req, self._deps.settings.api_max_body_bytes)
        run = enqueue_run(
            self._deps.pool,
            self._deps.broker,
            self._deps.settings,
            workflow_id=workflow_id,
            owner_id=owner,
            trigger_type="webhook",
            trigger_data=data,
            idempotency_key=_idempotency_key(req),
            traceparent=_traceparent(req),
            sender=self._deps.sender,
        )
        _accepted(resp, run.run_id, run.status)


def run_view(row: dict[str, Any]) -> Any:
    return _dump(schemas.Run.model_validate(row))


class RunResource:
    query_params = frozenset({"include"})

    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response, run_id: UUID) -> None:
        include = choice_param(query(req), "include", ("definition",))
        run = queries.get_run(self._deps.pool, caller_of(req).user_id, run_id, with_definition=include == "definition")
        resp.media = run_view(run)


class RunsResource:
    """``GET /api/runs`` and ``GET /api/workflows/{id}/runs``."""

    def __init__(self, deps: Dependencies, *, of_workflow: bool = False) -> None:
        self._deps = deps
        self.query_params = frozenset({"limit", "cursor", "status", "since", "until"})
        if not of_workflow:
            self.query_params |= {"workflowId"}

    def on_get(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID | None = None) -> None:
        caller = caller_of(req)
        params = query(req)
        if workflow_id is not None:
            queries.get_workflow(self._deps.pool, caller.user_id, workflow_id)  # 404 for others' workflows
        else:
            workflow_id = uuid_param(params, "workflowId")
        limit, after = _page_params(params)
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
        rows, cursor = _page(rows, limit, "queued_at")
        resp.media = {
            "items": [_dump(schemas.RunSummary.model_validate(r)) for r in rows],
            "nextCursor": cursor,
        }


class CancelRunResource:
    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    def on_post(self, req: falcon.Request, resp: falcon.Response, run_id: UUID) -> None:
        status = cancel_run(self._deps.pool, run_id, caller_of(req).user_id)
        resp.media = {"id": str(run_id), "status": status, "cancelRequested": status == "running"}


class RetryRunResource:
    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    def on_post(self, req: falcon.Request, resp: falcon.Response, run_id: UUID) -> None:
        status = queries.retry_run(
            self._deps.pool, self._deps.broker, self._deps.settings, caller_of(req).user_id, run_id
        )
        _accepted(resp, run_id, status)
        resp.media["message"] = "Run queued again for execution"


def scheduler_status(deps: Dependencies) -> dict[str, Any]:
    if deps.scheduler is None:
        return {"initialized": False, "scheduledWorkflows": 0}
    try:
        return dict(deps.scheduler.status())
    except Exception:
        return {"initialized": False, "scheduledWorkflows": 0}


class QueueStatsResource:
    """The seeds' queue stats: aggregate counts only, so readable without a token."""

    public = True
    CACHE_SECONDS = 1.0  # public and unauthenticated: a flood of reads costs one query a second

    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps
        self._cached: tuple[float, dict[str, Any]] | None = None

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        cached = self._cached
        if cached is not None and cached[0] > time.monotonic():
            resp.media = cached[1]
            return
        stats = get_queue_stats(
            self._deps.pool, self._deps.settings, self._deps.limiter, redis=self._deps.redis is not None
        )
        body = seeds_stats_body(stats, scheduler_status(self._deps))
        self._cached = (time.monotonic() + self.CACHE_SECONDS, body)
        resp.media = body


class ScheduleResource:
    """``GET /api/workflows/{id}/schedule``: the next fire times, the last fire and missed fires."""

    query_params = frozenset({"count"})

    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        count = int_param(query(req), "count", 5, 1, PREVIEW_MAX)
        preview = schedule_preview(self._deps.pool, str(workflow_id), str(caller_of(req).user_id), count)
        resp.media = _dump(schemas.SchedulePreview.model_validate(preview))


class SchedulerRefreshResource:
    """The seeds' manual refresh; changes made through the API reach the scheduler on their own."""

    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self._deps.scheduler is None:
            raise InfrastructureError("no scheduler is connected")
        try:
            self._deps.scheduler.refresh()
        except redis.RedisError:
            raise InfrastructureError("Redis is unavailable; the scheduler reloads on its own every 30 s") from None
        resp.status = falcon.HTTP_202
        resp.media = {"success": True, "message": "Scheduler refresh requested"}


class SecretsResource:
    """``GET /api/secrets``: names and times only; values never leave the database decrypted."""

    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        items = secrets.list_secrets(self._deps.pool, caller_of(req).user_id)
        resp.media = _dump(schemas.SecretList(items=[schemas.Secret.model_validate(vars(i)) for i in items]))


class SecretResource:
    """``PUT|DELETE /api/secrets/{name}``: steps use a secret as ``{{ secrets.NAME }}``."""

    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    def on_put(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        body = validate(schemas.SecretValue, read_json(req, self._deps.settings.api_max_body_bytes))
        info = secrets.put_secret(self._deps.pool, self._deps.settings, caller_of(req).user_id, name, body.value)
        resp.media = _dump(schemas.Secret.model_validate(vars(info)))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        secrets.delete_secret(self._deps.pool, caller_of(req).user_id, name)
        resp.status = falcon.HTTP_204
