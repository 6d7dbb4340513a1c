"""Every URL of the API and the resource that answers it: the one list the app mounts.

The OpenAPI document is built from the same list (``openapi.document(ROUTES)``), so a route
added here is documented (and fuzzed) with the operations its resource declares.
"""

from __future__ import annotations

from dataclasses import dataclass

import falcon

from sluice_api.resources import health, hooks, queue, runs, secrets, workflows
from sluice_api.resources.base import Context, Resource

_WORKFLOW = "/api/workflows/{workflow_id:uuid}"
_RUN = "/api/runs/{run_id:uuid}"


@dataclass(frozen=True)
class Route:
    """A Falcon URL template and the resource class mounted there."""

    template: str
    resource: type[Resource]


ROUTES: tuple[Route, ...] = (
    Route("/api/health", health.HealthResource),
    Route("/api/ready", health.ReadyResource),
    Route("/api/openapi.json", health.OpenApiResource),
    Route("/api/workflows", workflows.WorkflowsResource),
    Route("/api/workflows/queue/stats", queue.QueueStatsResource),
    Route(_WORKFLOW, workflows.WorkflowResource),
    Route(f"{_WORKFLOW}/run", runs.RunWorkflowResource),
    Route(f"{_WORKFLOW}/runs", runs.WorkflowRunsResource),
    Route(f"{_WORKFLOW}/webhook/rotate", workflows.WebhookRotateResource),
    Route(f"{_WORKFLOW}/schedule", workflows.ScheduleResource),
    Route(f"{_WORKFLOW}/versions", workflows.WorkflowVersionsResource),
    Route(f"{_WORKFLOW}/versions/{{version:int(min=1,max=2147483647)}}", workflows.WorkflowVersionResource),
    Route("/api/runs", runs.RunsResource),
    Route(_RUN, runs.RunResource),
    Route(f"{_RUN}/cancel", runs.CancelRunResource),
    Route(f"{_RUN}/retry", runs.RetryRunResource),
    Route("/api/hooks/{secret}", hooks.HookResource),
    Route("/api/scheduler/refresh", queue.SchedulerRefreshResource),
    Route("/api/secrets", secrets.SecretsResource),
    Route("/api/secrets/{name}", secrets.SecretResource),
)


def mount(app: falcon.App[falcon.Request, falcon.Response], ctx: Context) -> None:
    """Add every route of ``ctx.routes`` to the app, each with one instance of its resource."""
    for route in ctx.routes:
        app.add_route(route.template, route.resource(ctx))
