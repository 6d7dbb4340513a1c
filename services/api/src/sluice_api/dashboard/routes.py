"""Every URL of the dashboard and the page that answers it: the one list ``install`` mounts.

The JSON API keeps ``/api``; the dashboard has the rest, and its files are under ``/static``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sluice_api.dashboard import account, queue, runs, workflows
from sluice_api.dashboard.web import Page

_WORKFLOW = "/workflows/{workflow_id:uuid}"
_RUN = "/runs/{run_id:uuid}"


@dataclass(frozen=True)
class PageRoute:
    template: str
    page: type[Page]


PAGES: tuple[PageRoute, ...] = (
    PageRoute("/", workflows.HomePage),
    PageRoute("/login", account.LoginPage),
    PageRoute("/logout", account.LogoutPage),
    PageRoute("/workflows/new", workflows.NewWorkflowPage),
    PageRoute(_WORKFLOW, workflows.WorkflowPage),
    PageRoute(f"{_WORKFLOW}/run", workflows.RunWorkflowPage),
    PageRoute(f"{_WORKFLOW}/status", workflows.WorkflowStatusPage),
    PageRoute(f"{_WORKFLOW}/webhook", workflows.WebhookRotatePage),
    PageRoute(f"{_WORKFLOW}/delete", workflows.WorkflowDeletePage),
    PageRoute(f"{_WORKFLOW}/diff", workflows.VersionDiffPage),
    PageRoute("/runs", runs.RunsPage),
    PageRoute("/runs/bulk", runs.BulkRunsPage),
    PageRoute(_RUN, runs.RunPage),
    PageRoute(f"{_RUN}/live", runs.RunLivePage),
    PageRoute(f"{_RUN}/cancel", runs.CancelRunPage),
    PageRoute(f"{_RUN}/retry", runs.RetryRunPage),
    PageRoute("/queue", queue.QueuePage),
    PageRoute("/queue/live", queue.QueueLivePage),
    PageRoute("/secrets", account.SecretsPage),
    PageRoute("/secrets/{name}/delete", account.SecretDeletePage),
)
