"""The runs pages: the filtered list with bulk cancel and retry, and a run with its live timeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

import falcon

from sluice_api import queries, schemas
from sluice_api.dashboard import views
from sluice_api.dashboard.web import Page, caller_of_page, form_of
from sluice_api.inputs import decode_cursor
from sluice_api.resources.base import PAGE_DEFAULT, page
from sluice_common.errors import ConflictError, NotFoundError
from sluice_common.runs import TRIGGER_TYPES, cancel_run

BULK_MAX = 1000  # runs one bulk action goes through; the page says when there were more
FILTERS = ("status", "workflow", "trigger", "since", "until")


@dataclass(frozen=True)
class RunFilters:
    status: str | None
    workflow_id: UUID | None
    trigger: str | None
    since_text: str
    until_text: str

    @classmethod
    def read(cls, get: Any) -> RunFilters:
        """From query parameters or form fields (``get(name)``); anything unknown means no filter."""
        status = get("status") or None
        trigger = get("trigger") or None
        try:
            workflow_id = UUID(get("workflow")) if get("workflow") else None
        except ValueError:
            workflow_id = None
        return cls(
            status if status in schemas.RUN_STATUSES else None,
            workflow_id,
            trigger if trigger in TRIGGER_TYPES else None,
            (get("since") or "")[:40],
            (get("until") or "")[:40],
        )

    def query(self) -> dict[str, Any]:
        return {
            "workflow_id": self.workflow_id,
            "status": self.status,
            "trigger_type": self.trigger,
            "since": views.parse_utc_input(self.since_text),
            "until": views.parse_utc_input(self.until_text),
        }

    def fields(self) -> dict[str, str]:
        """The filters as form fields (for the bulk form and the next page's link)."""
        return {
            "status": self.status or "",
            "workflow": str(self.workflow_id) if self.workflow_id else "",
            "trigger": self.trigger or "",
            "since": self.since_text,
            "until": self.until_text,
        }


class RunsPage(Page):
    """``GET /runs``: runs newest first, filtered by status, workflow, trigger and queue time, a page at
    a time (keyset cursors: as fast on the millionth run as on the first)."""

    nav = "runs"
    query_params = frozenset({*FILTERS, "cursor"})

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        owner = caller_of_page(req).user_id
        filters = RunFilters.read(req.get_param)
        raw_cursor = req.get_param("cursor")
        after = decode_cursor({"cursor": raw_cursor}) if raw_cursor else None
        rows = queries.list_runs(self._deps.pool, owner, limit=PAGE_DEFAULT, after=after, **filters.query())
        rows, cursor = page(rows, PAGE_DEFAULT, "queued_at")
        workflows = queries.list_workflows(
            self._deps.pool, owner, limit=queries.PAGE_MAX, after=None, status=None, trigger_type=None
        )
        names = {w["id"]: w["name"] for w in workflows}
        self.render(
            req,
            resp,
            "runs.html",
            runs=rows,
            names=names,
            workflows=workflows[: queries.PAGE_MAX],
            filters=filters,
            fields=filters.fields(),
            filter_query=urlencode({k: v for k, v in filters.fields().items() if v}),
            statuses=schemas.RUN_STATUSES,
            triggers=TRIGGER_TYPES,
            cursor=cursor,
            first_page=raw_cursor is None,
        )


class BulkRunsPage(Page):
    """``POST /runs/bulk``: cancel, or retry, every run the filters select (up to ``BULK_MAX``), each
    through the same call as the API's cancel and retry; runs in a state that refuses it are counted."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        form = form_of(req)
        action = form.get("action")
        if action not in ("cancel", "retry"):
            raise falcon.HTTPBadRequest(title="Bad Request", description="action must be cancel or retry")
        owner = caller_of_page(req).user_id
        filters = RunFilters.read(form.get)
        query = filters.query()
        # Only runs the action can apply to: a status filter outside those selects nothing.
        applicable = views.CANCELLABLE if action == "cancel" else views.RETRYABLE
        statuses = [filters.status] if filters.status else sorted(applicable)
        done = refused = seen = 0
        more = False
        for status in statuses:
            if status not in applicable:
                continue
            after = None
            while seen < BULK_MAX:
                rows = queries.list_runs(
                    self._deps.pool,
                    owner,
                    limit=min(queries.PAGE_MAX, BULK_MAX - seen),
                    after=after,
                    **(query | {"status": status}),
                )
                batch, cursor = page(rows, min(queries.PAGE_MAX, BULK_MAX - seen), "queued_at")
                for row in batch:
                    seen += 1
                    try:
                        if action == "cancel":
                            cancel_run(self._deps.pool, row["id"], owner)
                        else:
                            queries.retry_run(self._deps.pool, self._deps.broker, self._deps.settings, owner, row["id"])
                        done += 1
                    except (ConflictError, NotFoundError):
                        refused += 1  # it moved on meanwhile (finished, or retried by someone else)
                if cursor is None:
                    break
                after = decode_cursor({"cursor": cursor})
            more = more or seen >= BULK_MAX
        verb = "Cancelled" if action == "cancel" else "Retried"
        message = f"{verb} {done} run(s)."
        if refused:
            message += f" {refused} had already moved on."
        if more:
            message += f" Stopped at {BULK_MAX}: run it again for the rest."
        fields = urlencode({k: v for k, v in filters.fields().items() if v})
        self.redirect(resp, f"/runs?{fields}" if fields else "/runs", message)


def _run_context(pool: Any, owner: UUID, run_id: UUID) -> dict[str, Any]:
    run = queries.get_run(pool, owner, run_id)
    return {
        "run": run,
        "bars": views.timeline(run["steps"], run["started_at"]),
        "live": run["status"] not in views.FINISHED,
        "cancellable": run["status"] in views.CANCELLABLE,
        "retryable": run["status"] in views.RETRYABLE,
    }


class RunPage(Page):
    """``GET /runs/{id}``: status, attempts, the step timeline with outputs and errors, trigger data,
    the trace id; cancel and retry. While the run goes on, its body is polled from ``/live``."""

    nav = "runs"

    def on_get(self, req: falcon.Request, resp: falcon.Response, run_id: UUID) -> None:
        owner = caller_of_page(req).user_id
        ctx = _run_context(self._deps.pool, owner, run_id)
        try:
            wf = queries.get_workflow(self._deps.pool, owner, ctx["run"]["workflow_id"])
        except NotFoundError:
            wf = None  # deleted since: its runs stay readable
        self.render(req, resp, "run.html", wf=wf, **ctx)


class RunLivePage(Page):
    """``GET /runs/{id}/live``: the run's body alone, for htmx to swap in every 2 s."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, run_id: UUID) -> None:
        ctx = _run_context(self._deps.pool, caller_of_page(req).user_id, run_id)
        self.render(req, resp, "run_body.html", **ctx)


class CancelRunPage(Page):
    """``POST /runs/{id}/cancel``."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, run_id: UUID) -> None:
        try:
            status = cancel_run(self._deps.pool, run_id, caller_of_page(req).user_id)
        except ConflictError as exc:
            self.redirect(resp, f"/runs/{run_id}", f"Not cancelled: {exc}.")
        message = "Cancelled." if status == "cancelled" else "Cancel requested: it stops at its next step."
        self.redirect(resp, f"/runs/{run_id}", message)


class RetryRunPage(Page):
    """``POST /runs/{id}/retry``."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, run_id: UUID) -> None:
        try:
            queries.retry_run(
                self._deps.pool, self._deps.broker, self._deps.settings, caller_of_page(req).user_id, run_id
            )
        except ConflictError as exc:
            self.redirect(resp, f"/runs/{run_id}", f"Not retried: {exc}.")
        self.redirect(resp, f"/runs/{run_id}", "Queued again.")
