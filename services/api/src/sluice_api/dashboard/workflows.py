"""The workflows pages: the list (with search) at ``/``, a workflow with its editor, versions and schedule."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import falcon

from sluice_api import commands, queries, schemas
from sluice_api.dashboard import views
from sluice_api.dashboard.web import Page, caller_of_page, form_of
from sluice_api.inputs import check_storable, decode_cursor
from sluice_api.resources.base import PAGE_DEFAULT, page
from sluice_common.cron import schedule_preview
from sluice_common.errors import ConflictError, FieldProblem, NotFoundError, ValidationFailed, field_problems
from sluice_common.runs import MAX_DELAY_MS

RECENT_RUNS = 10
SCHEDULE_FIRES = 5


def _parse_definition(text: str) -> Any:
    """The editor's JSON, or ``ValidationFailed`` at ``$`` saying where it stops being JSON."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise ValidationFailed([FieldProblem("$", f"not JSON: {exc.msg} at {where}")]) from None
    check_storable(data)
    return data


def _as_uuid(text: str) -> UUID | None:
    try:
        return UUID(text.strip())
    except ValueError:
        return None


class HomePage(Page):
    """``GET /``: your workflows, newest first; the search box finds a workflow by name, or a run or
    workflow by id."""

    nav = "workflows"
    query_params = frozenset({"q", "cursor"})

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        owner = caller_of_page(req).user_id
        search = (req.get_param("q") or "").strip()[:200]
        wanted = _as_uuid(search) if search else None
        if wanted is not None:
            for kind, find in (("runs", queries.get_run), ("workflows", queries.get_workflow)):
                try:
                    find(self._deps.pool, owner, wanted)
                except NotFoundError:
                    continue
                raise falcon.HTTPSeeOther(f"/{kind}/{wanted}")
        raw_cursor = req.get_param("cursor")
        after = decode_cursor({"cursor": raw_cursor}) if raw_cursor else None
        rows = queries.list_workflows(
            self._deps.pool,
            owner,
            limit=PAGE_DEFAULT,
            after=after,
            status=None,
            trigger_type=None,
            name_contains=search or None,
        )
        rows, cursor = page(rows, PAGE_DEFAULT, "created_at")
        last = queries.last_runs(self._deps.pool, owner, [r["id"] for r in rows])
        items = [
            {"row": r, "trigger": views.trigger_view(r["trigger"], r["status"] == "active"), "last": last.get(r["id"])}
            for r in rows
        ]
        self.render(req, resp, "workflows.html", items=items, search=search, cursor=cursor, id_searched=wanted)


class NewWorkflowPage(Page):
    """``GET|POST /workflows/new``: the editor, filled from an example; saving creates the workflow."""

    nav = "workflows"
    query_params = frozenset({"example"})

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _, body = views.EXAMPLES.get(req.get_param("example") or "http", views.EXAMPLES["http"])
        self.render(req, resp, "new.html", text=views.pretty_json(body), problems=[], examples=views.EXAMPLES)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        text = form_of(req).get("definition", "")
        try:
            saved = commands.create_workflow(self._deps, caller_of_page(req).user_id, _parse_definition(text))
        except ValidationFailed as exc:
            self.render(req, resp, "new.html", 422, text=text, problems=exc.problems, examples=views.EXAMPLES)
            return
        if saved.secret is not None:
            # Shown once, like the API's 201: render the page now rather than redirect.
            WorkflowPage(self._dash).show(req, resp, saved.row["id"], webhook_url=self._hook(req, saved.secret))
            return
        self.redirect(resp, f"/workflows/{saved.row['id']}", "Workflow created.")

    def _hook(self, req: falcon.Request, secret: str) -> str:
        return commands.webhook_url(self._deps, req.prefix, secret)


class WorkflowPage(Page):
    """``GET|POST /workflows/{id}``: the workflow, its editor (saving makes a version), the run form,
    the webhook, the schedule, the versions and the latest runs."""

    nav = "workflows"
    query_params = frozenset({"version"})

    def show(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        workflow_id: UUID,
        *,
        status: int = 200,
        text: str | None = None,
        problems: list[FieldProblem] | None = None,
        run_problems: list[FieldProblem] | None = None,
        webhook_url: str | None = None,
        loaded_version: int | None = None,
    ) -> None:
        owner = caller_of_page(req).user_id
        pool = self._deps.pool
        row = queries.get_workflow(pool, owner, workflow_id)
        if text is None:
            body = queries.definition_of(row)
            if loaded_version is not None:
                old = queries.get_version(pool, owner, workflow_id, loaded_version)
                body = views.version_body(old) | {"status": row["status"]}
            text = views.pretty_json(body)
        versions = queries.list_versions(pool, owner, workflow_id, limit=queries.PAGE_MAX, before=None)
        schedule = None
        if row["trigger_type"] == "cron":
            try:
                schedule = schedule_preview(pool, str(workflow_id), str(owner), SCHEDULE_FIRES)
            except ConflictError:
                schedule = None
        runs = queries.list_runs(
            pool, owner, limit=RECENT_RUNS, after=None, workflow_id=workflow_id, status=None, since=None, until=None
        )[:RECENT_RUNS]
        self.render(
            req,
            resp,
            "workflow.html",
            status,
            wf=row,
            trigger=views.trigger_view(row["trigger"], row["status"] == "active"),
            cron_words=views.cron_words(schedule.schedule) if schedule else None,
            text=text,
            problems=problems or [],
            run_problems=run_problems or [],
            versions=versions[: queries.PAGE_MAX],
            schedule=schedule,
            runs=runs,
            webhook_url=webhook_url,
            loaded_version=loaded_version,
            max_delay=MAX_DELAY_MS,
        )

    def on_get(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        version = req.get_param_as_int("version", min_value=1, max_value=2**31 - 1)
        self.show(req, resp, workflow_id, loaded_version=version)

    def on_post(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        form = form_of(req)
        text = form.get("definition", "")
        expected = int(form["version"]) if form.get("version", "").isdigit() else None
        try:
            saved = commands.replace_workflow(
                self._deps, caller_of_page(req).user_id, workflow_id, _parse_definition(text), expected
            )
        except ValidationFailed as exc:
            self.show(req, resp, workflow_id, status=422, text=text, problems=exc.problems)
            return
        except ConflictError as exc:
            self.show(req, resp, workflow_id, status=409, text=text, problems=[FieldProblem("$", str(exc))])
            return
        if saved.secret is not None:
            url = commands.webhook_url(self._deps, req.prefix, saved.secret)
            self.show(req, resp, workflow_id, webhook_url=url)
            return
        self.redirect(resp, f"/workflows/{workflow_id}", f"Saved as version {saved.row['version']}.")


class RunWorkflowPage(Page):
    """``POST /workflows/{id}/run``: queue a run with optional trigger data, priority and delay."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        form = form_of(req)
        owner = caller_of_page(req).user_id
        try:
            data: dict[str, Any] = {}
            raw = form.get("trigger_data", "").strip()
            if raw:
                try:
                    data["triggerData"] = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise ValidationFailed(
                        [FieldProblem("$.triggerData", f"not JSON: {exc.msg} at line {exc.lineno}")]
                    ) from None
                check_storable(data["triggerData"])
            for field in ("priority", "delay"):
                value = form.get(field, "").strip()
                if value:
                    data[field] = int(value) if value.lstrip("-").isdigit() else value
            try:
                body = schemas.RunRequest.model_validate(data)
            except ValueError as exc:  # pydantic's ValidationError
                raise ValidationFailed(field_problems(exc)) from None  # type: ignore[arg-type]
            run = commands.run_workflow(
                self._deps,
                owner,
                workflow_id,
                trigger_data=body.trigger_data,
                priority=body.priority,
                delay_ms=body.delay,
            )
        except ValidationFailed as exc:
            WorkflowPage(self._dash).show(req, resp, workflow_id, status=422, run_problems=exc.problems)
            return
        except ConflictError as exc:
            self.redirect(resp, f"/workflows/{workflow_id}", str(exc))
        self.redirect(resp, f"/runs/{run.run_id}", f"Run queued ({run.status}).")


class WorkflowStatusPage(Page):
    """``POST /workflows/{id}/status``: pause or resume (a merge patch of the status, a new version)."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        status = form_of(req).get("status")
        if status not in ("active", "paused"):
            raise ValidationFailed([FieldProblem("status", "must be active or paused")])
        commands.patch_workflow(self._deps, caller_of_page(req).user_id, workflow_id, {"status": status}, None)
        self.redirect(resp, f"/workflows/{workflow_id}", "Resumed." if status == "active" else "Paused.")


class WebhookRotatePage(Page):
    """``POST /workflows/{id}/webhook``: a new webhook secret; the new URL is shown this once."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        _, secret = queries.rotate_webhook(self._deps.pool, caller_of_page(req).user_id, workflow_id)
        url = commands.webhook_url(self._deps, req.prefix, secret)
        WorkflowPage(self._dash).show(req, resp, workflow_id, webhook_url=url)


class WorkflowDeletePage(Page):
    """``POST /workflows/{id}/delete``: delete it and cancel its unfinished runs (as the API does)."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        commands.delete_workflow(self._deps, caller_of_page(req).user_id, workflow_id)
        self.redirect(resp, "/", "Workflow deleted.")


class VersionDiffPage(Page):
    """``GET /workflows/{id}/diff?a=&b=``: what changed between two versions."""

    nav = "workflows"
    query_params = frozenset({"a", "b"})

    def on_get(self, req: falcon.Request, resp: falcon.Response, workflow_id: UUID) -> None:
        owner = caller_of_page(req).user_id
        wf = queries.get_workflow(self._deps.pool, owner, workflow_id)
        a = req.get_param_as_int("a", min_value=1, max_value=2**31 - 1) or max(wf["version"] - 1, 1)
        b = req.get_param_as_int("b", min_value=1, max_value=2**31 - 1) or wf["version"]
        old = queries.get_version(self._deps.pool, owner, workflow_id, a)
        new = queries.get_version(self._deps.pool, owner, workflow_id, b)
        lines = views.diff(views.version_body(old), views.version_body(new), f"version {a}", f"version {b}")
        self.render(req, resp, "diff.html", wf=wf, a=a, b=b, lines=lines)
