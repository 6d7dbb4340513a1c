"""What the JSON API and the dashboard both do to workflows and runs: one copy of each rule.

The resources (``sluice_api.resources``) and the dashboard's pages (``sluice_api.dashboard``) read
their input in their own way (a JSON body, a form) and answer in their own way (JSON, HTML), but
validate, write, notify the scheduler and queue through these functions, so that the two can
never disagree on what a request does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from sluice_api import queries
from sluice_api.deps import Dependencies
from sluice_common.errors import ConflictError
from sluice_common.runs import EnqueuedRun, NewRun, enqueue_run
from sluice_common.workflow import validate_workflow

PATCH_TRIES = 5


@dataclass(frozen=True)
class Saved:
    """A workflow as a write left it; ``secret`` is a new webhook secret, shown once."""

    row: dict[str, Any]
    secret: str | None


def notify_scheduler(deps: Dependencies, *rows: dict[str, Any]) -> None:
    """Tell the scheduler about a change that involves a cron trigger (before or after)."""
    if deps.scheduler is not None and any(r["trigger_type"] == "cron" for r in rows):
        deps.scheduler.trigger_changed(str(rows[0]["id"]))


def webhook_url(deps: Dependencies, request_prefix: str, secret: str) -> str:
    """The URL a webhook secret is called at: the public URL when set, else the request's own host."""
    base = deps.settings.public_url.rstrip("/") if deps.settings.public_url else request_prefix
    return f"{base}/api/hooks/{secret}"


def create_workflow(deps: Dependencies, owner: UUID, data: Any) -> Saved:
    """Validate a definition (``ValidationFailed`` lists every problem by JSON path) and store it."""
    definition = validate_workflow(data)
    row, secret = queries.create_workflow(deps.pool, owner, definition)
    notify_scheduler(deps, row)
    return Saved(row, secret)


def replace_workflow(deps: Dependencies, owner: UUID, workflow_id: UUID, data: Any, expected: int | None) -> Saved:
    """Replace a definition (a new version); ``expected`` refuses a lost update (``ConflictError``)."""
    definition = validate_workflow(data)
    old, row, secret = queries.update_workflow(deps.pool, owner, workflow_id, definition, expected_version=expected)
    notify_scheduler(deps, row, old)
    return Saved(row, secret)


def delete_workflow(deps: Dependencies, owner: UUID, workflow_id: UUID) -> None:
    """Delete the workflow (its runs stay readable), cancel its unfinished runs, tell the scheduler."""
    row = queries.delete_workflow(deps.pool, owner, workflow_id)
    notify_scheduler(deps, row)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def patch_workflow(
    deps: Dependencies, owner: UUID, workflow_id: UUID, patch: dict[str, Any], expected: int | None
) -> Saved:
    """Apply a merge patch to the current version (pause and resume are ``{"status": ...}``)."""
    for tries_left in range(PATCH_TRIES - 1, -1, -1):
        current = queries.get_workflow(deps.pool, owner, workflow_id)
        if expected is not None and current["version"] != expected:
            raise ConflictError(
                f"the workflow is at version {current['version']}, not {expected}; fetch it and try again"
            )
        try:
            # Applied to the version read just now: a concurrent update in between is not
            # overwritten but makes this patch apply again to the newer version.
            return replace_workflow(
                deps, owner, workflow_id, merge_patch(queries.definition_of(current), patch), current["version"]
            )
        except ConflictError:
            if expected is not None or tries_left == 0:
                raise
    raise AssertionError("unreachable")  # the loop returns or raises


def run_workflow(
    deps: Dependencies,
    owner: UUID,
    workflow_id: UUID,
    *,
    trigger_data: Any,
    priority: int,
    delay_ms: int,
    idempotency_key: str | None = None,
    traceparent: str | None = None,
) -> EnqueuedRun:
    """Queue a manual run of the workflow (404 for another user's, 409 for a paused one)."""
    return enqueue_run(
        deps.pool,
        deps.broker,
        deps.settings,
        NewRun(
            workflow_id,
            owner,
            "manual",
            trigger_data,
            priority=priority,
            delay_ms=delay_ms,
            idempotency_key=idempotency_key,
            traceparent=traceparent,
        ),
        sender=deps.sender,
        inserts=deps.inserts,
    )
