"""The dashboard's pages on the real app and a real PostgreSQL, without a browser: sign-in and
sessions, CSRF, per-user isolation, the editor's problems, filters and bulk actions.

(The browser tests in ``tests/e2e/test_dashboard_browser.py`` drive the same pages in Chromium.)
"""

from __future__ import annotations

import html
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import falcon.testing
import pytest

from sluice_api.app import Dependencies, create_app
from sluice_api.dashboard.account import LOGIN_CSRF_COOKIE
from sluice_api.dashboard.sessions import SESSION_COOKIE
from sluice_common import users
from sluice_common.runs import queue_history
from tests.integration.conftest import Pipeline

CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class Browser:
    """A cookie jar over the test client, like a browser's (the cookies the app sets come back)."""

    client: falcon.testing.TestClient
    cookies: dict[str, str] = field(default_factory=dict)

    def request(self, method: str, path: str, **kwargs: Any) -> falcon.testing.Result:
        result = self.client.simulate_request(method, path, cookies=dict(self.cookies), **kwargs)
        for name, cookie in result.cookies.items():
            if cookie.value and (cookie.max_age is None or cookie.max_age > 0):
                self.cookies[name] = cookie.value
            else:
                self.cookies.pop(name, None)
        return result

    def get(self, path: str, **kwargs: Any) -> falcon.testing.Result:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, form: dict[str, str], **kwargs: Any) -> falcon.testing.Result:
        body = "&".join(f"{k}={falcon.uri.encode_value(v)}" for k, v in form.items())
        headers = {"Content-Type": "application/x-www-form-urlencoded", **kwargs.pop("headers", {})}
        return self.request("POST", path, body=body, headers=headers, **kwargs)

    def csrf(self, path: str = "/") -> str:
        match = CSRF_INPUT.search(self.get(path).text)
        assert match, "no CSRF field on the page"
        return match.group(1)


@dataclass
class Dash:
    app: falcon.App[falcon.Request, falcon.Response]
    pipeline: Pipeline

    def user(self) -> tuple[str, Browser]:
        """A new user's token and a browser signed in with it."""
        with self.pipeline.pool.connection() as conn:
            issued = users.create_user(conn, f"u{uuid.uuid4().hex[:10]}")
        browser = Browser(falcon.testing.TestClient(self.app))
        sign_in(browser, issued.token)
        return issued.token, browser


def sign_in(browser: Browser, token: str) -> falcon.testing.Result:
    page = browser.get("/login")
    login_csrf = CSRF_INPUT.search(page.text)
    assert login_csrf
    return browser.post("/login", {"csrf_token": login_csrf.group(1), "token": token, "next": "/runs"})


@pytest.fixture
def dash(pipeline: Pipeline) -> Dash:
    deps = Dependencies(pipeline.settings, pipeline.pool, pipeline.redis, pipeline.broker, pipeline.limiter)
    return Dash(create_app(deps), pipeline)


def create_workflow(browser: Browser, definition: str) -> falcon.testing.Result:
    return browser.post("/workflows/new", {"csrf_token": browser.csrf(), "definition": definition})


GOOD = (
    '{"name": "hello", "trigger": {"type": "manual"},'
    ' "steps": [{"id": "a", "type": "transform", "config": {"value": 1}}]}'
)


def test_signing_in_makes_a_strict_http_only_session_and_signing_out_ends_it(dash: Dash) -> None:
    token, browser = dash.user()
    assert SESSION_COOKIE in browser.cookies
    home = browser.get("/")
    assert home.status_code == 200
    assert "Sign out" in home.text

    fresh = Browser(falcon.testing.TestClient(dash.app))
    signed = sign_in(fresh, token)
    assert signed.status_code == 303
    assert signed.headers["location"] == "/runs"
    cookie = signed.cookies[SESSION_COOKIE]
    assert cookie.http_only
    assert cookie.same_site == "Strict"
    assert cookie.path == "/"
    stolen = dict(fresh.cookies)

    out = fresh.post("/logout", {"csrf_token": fresh.csrf()})
    assert out.status_code == 303
    assert out.headers["location"] == "/login"
    # The session is gone on the server: the same cookie, replayed, opens nothing.
    replay = falcon.testing.TestClient(dash.app).simulate_get("/", cookies=stolen)
    assert replay.status_code == 303
    assert replay.headers["location"].startswith("/login")
    # The other session of the same user is untouched.
    assert browser.get("/").status_code == 200


def test_a_bad_token_does_not_sign_in_and_revoking_the_token_ends_its_sessions(dash: Dash) -> None:
    browser = Browser(falcon.testing.TestClient(dash.app))
    refused = sign_in(browser, "slc_" + "x" * 43)
    assert refused.status_code == 401
    assert "Not signed in" in refused.text
    assert SESSION_COOKIE not in browser.cookies

    with dash.pipeline.pool.connection() as conn:
        name = f"u{uuid.uuid4().hex[:10]}"
        issued = users.create_user(conn, name)
    assert sign_in(browser, issued.token).status_code == 303
    assert browser.get("/").status_code == 200
    with dash.pipeline.pool.connection() as conn:
        users.revoke_tokens(conn, name)
    assert browser.get("/").status_code == 303


def test_pages_need_a_session_and_the_api_keeps_its_bearer_tokens(dash: Dash) -> None:
    token, browser = dash.user()
    anonymous = falcon.testing.TestClient(dash.app)
    for path in ("/", "/runs", "/queue", "/secrets", "/workflows/new"):
        answer = anonymous.simulate_get(path)
        assert answer.status_code == 303, path
        assert answer.headers["location"] == "/login?next=" + falcon.uri.encode_value(path)
    # A bearer token is no session (the dashboard reads only its cookie) ...
    assert anonymous.simulate_get("/", headers={"Authorization": f"Bearer {token}"}).status_code == 303
    # ... and the API is unchanged: bearer tokens, problem+json, no cookie needed.
    api = anonymous.simulate_get("/api/workflows", headers={"Authorization": f"Bearer {token}"})
    assert api.status_code == 200
    assert api.json == {"items": [], "nextCursor": None}
    assert browser.get("/api/workflows").status_code == 401
    missing = anonymous.simulate_get("/api/nothing-here")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    page = browser.get("/nothing-here")
    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")


def test_every_post_needs_the_sessions_csrf_token(dash: Dash) -> None:
    _, browser = dash.user()
    _, other = dash.user()
    for form in ({}, {"csrf_token": "wrong"}, {"csrf_token": other.csrf()}):
        refused = browser.post("/secrets", {**form, "name": "API_KEY", "value": "v"})
        assert refused.status_code == 403, form
    assert "API_KEY" not in browser.get("/secrets").text
    # The header htmx sends is as good as the field.
    token = browser.csrf()
    ok = browser.post("/secrets", {"name": "API_KEY", "value": "v"}, headers={"X-CSRF-Token": token})
    assert ok.status_code == 303
    assert "API_KEY" in browser.get("/secrets").text
    # Before a session, the sign-in form has its own token (a cookie and a field that must match).
    fresh = Browser(falcon.testing.TestClient(dash.app))
    fresh.get("/login")
    assert LOGIN_CSRF_COOKIE in fresh.cookies
    assert fresh.post("/login", {"csrf_token": "forged", "token": "slc_x"}).status_code == 403


def test_the_editor_shows_each_problem_at_its_json_path_and_saves_a_fixed_definition(dash: Dash) -> None:
    _, browser = dash.user()
    bad = (
        '{"name": "", "trigger": {"type": "cron", "config": {"schedule": "61 * * * *"}},'
        ' "steps": [{"id": "a", "type": "http", "config": {"url": "ftp://x"}}]}'
    )
    answer = create_workflow(browser, bad)
    assert answer.status_code == 422
    for path in ("$.name", "$.trigger.config.schedule", "$.steps[0].config.url"):
        assert f'<code class="path">{path}</code>' in answer.text, path
    not_json = create_workflow(browser, '{"name": ')
    assert not_json.status_code == 422
    assert "not JSON" in not_json.text

    created = create_workflow(browser, GOOD)
    assert created.status_code == 303
    page_url = created.headers["location"]
    page = browser.get(page_url)
    assert page.status_code == 200
    assert "version 1" in page.text
    saved = browser.post(
        page_url, {"csrf_token": browser.csrf(), "definition": GOOD.replace("hello", "hi"), "version": "1"}
    )
    assert saved.status_code == 303
    assert "Saved as version 2" in browser.get(page_url).text
    diff = html.unescape(browser.get(f"{page_url}/diff?a=1&b=2").text)
    assert '<span class="d-del">-  "name": "hello",</span>' in diff
    assert '<span class="d-add">+  "name": "hi",</span>' in diff
    # A save from a stale page (version 1) is refused, not lost over version 2.
    stale = browser.post(page_url, {"csrf_token": browser.csrf(), "definition": GOOD, "version": "1"})
    assert stale.status_code == 409
    assert "is at version 2" in stale.text


def test_another_users_workflow_and_run_are_404_pages(dash: Dash) -> None:
    _, alice = dash.user()
    _, bob = dash.user()
    page_url = create_workflow(alice, GOOD).headers["location"]
    queued = alice.post(f"{page_url}/run", {"csrf_token": alice.csrf()})
    assert queued.status_code == 303
    run_url = queued.headers["location"]
    assert alice.get(run_url).status_code == 200
    for path in (page_url, run_url, f"{run_url}/live", f"{page_url}/diff?a=1&b=1"):
        answer = bob.get(path)
        assert answer.status_code == 404, path
        assert "Not found" in answer.text
    token = bob.csrf()
    for path in (f"{run_url}/cancel", f"{page_url}/run", f"{page_url}/status"):
        assert bob.post(path, {"csrf_token": token, "status": "paused"}).status_code == 404, path
    assert alice.get(run_url).status_code == 200
    # Searching for the id finds it for its owner only.
    run_id = run_url.rsplit("/", 1)[1]
    assert alice.get(f"/?q={run_id}").headers["location"] == run_url
    assert "No run or workflow of yours" in bob.get(f"/?q={run_id}").text


def test_runs_filter_and_bulk_cancel_only_the_selection(dash: Dash) -> None:
    _, browser = dash.user()
    first = create_workflow(browser, GOOD).headers["location"]
    second = create_workflow(browser, GOOD.replace("hello", "other")).headers["location"]
    for url in (first, first, second):
        answer = browser.post(f"{url}/run", {"csrf_token": browser.csrf(), "delay": "600000", "priority": "3"})
        assert answer.status_code == 303
    first_id = first.rsplit("/", 1)[1]
    listed = browser.get(f"/runs?workflow={first_id}&status=delayed")
    assert listed.text.count('class="badge s-delayed"') == 2
    assert browser.get("/runs?trigger=cron").text.count('class="badge s-') == 0

    done = browser.post(
        "/runs/bulk", {"csrf_token": browser.csrf(), "action": "cancel", "workflow": first_id, "status": ""}
    )
    assert done.status_code == 303
    assert "Cancelled 2 run(s)." in browser.get(done.headers["location"]).text
    everything = browser.get("/runs").text
    assert everything.count('class="badge s-cancelled"') == 2
    assert everything.count('class="badge s-delayed"') == 1


def test_the_run_form_checks_its_fields_like_the_api(dash: Dash) -> None:
    _, browser = dash.user()
    url = create_workflow(browser, GOOD).headers["location"]
    bad = browser.post(f"{url}/run", {"csrf_token": browser.csrf(), "priority": "11", "trigger_data": "{"})
    assert bad.status_code == 422
    assert "$.triggerData" in bad.text
    bad = browser.post(f"{url}/run", {"csrf_token": browser.csrf(), "priority": "11"})
    assert bad.status_code == 422
    assert "$.priority" in bad.text
    paused = browser.post(f"{url}/status", {"csrf_token": browser.csrf(), "status": "paused"})
    assert paused.status_code == 303
    refused = browser.post(f"{url}/run", {"csrf_token": browser.csrf()})
    assert refused.status_code == 303
    assert "paused" in browser.get(refused.headers["location"]).text.lower()
    assert browser.get("/runs").text.count('class="badge s-') == 0


def test_the_queue_history_counts_each_minutes_depth_and_endings(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, [{"id": "a", "type": "transform", "config": {"value": 1}}])
    with pipeline.pool.connection() as conn:
        row = conn.execute("SELECT now() AS now").fetchone()
        assert row is not None
        now = row["now"]

    def ago(minutes: float | None) -> Any:
        return None if minutes is None else now - timedelta(minutes=minutes)

    # (status, queued, not before, started, finished), in minutes before now.
    runs = [
        ("succeeded", 10, None, 5, 4.5),
        ("queued", 3, None, None, None),
        ("delayed", 20, 2, None, None),
        ("failed", 30, None, 29.5, 29),
        ("cancelled", 8, 1, None, 6),  # a delayed run cancelled before it was due: never waited
        ("running", 50, None, 45, None),
        ("succeeded", 200, None, 199, 198),  # long before the window
    ]
    with pipeline.pool.connection() as conn:
        for status, queued, not_before, started, finished in runs:
            conn.execute(
                "INSERT INTO runs (workflow_id, owner_id, workflow_version, trigger_type, status, max_attempts, "
                "queued_at, not_before, started_at, finished_at) VALUES (%s, %s, 1, 'manual', %s, 1, %s, %s, %s, %s)",
                (wf, owner, status, ago(queued), ago(not_before), ago(started), ago(finished)),
            )
    history = queue_history(pipeline.pool, 60)
    assert len(history) == 60
    assert history[-1].at >= now > history[-2].at
    # The oracle: a run waits from when it is due until it starts or ends.
    for minute in history:
        waiting = 0
        for _, queued, not_before, started, finished in runs:
            due = max(ago(queued), ago(not_before) or ago(queued))
            left = ago(started) if started is not None else ago(finished)
            waiting += due <= minute.at and (left is None or left > minute.at)
        assert minute.depth == waiting, minute

        def ended(status: str, at: datetime = minute.at) -> int:
            return sum(
                1
                for s, _, _, _, finished in runs
                if s == status and finished is not None and at - timedelta(minutes=1) < ago(finished) <= at
            )

        assert (minute.succeeded, minute.failed, minute.cancelled) == (
            ended("succeeded"),
            ended("failed"),
            ended("cancelled"),
        ), minute
    assert max(m.depth for m in history) == 2
    assert sum(m.succeeded for m in history) == 1
    assert sum(m.cancelled for m in history) == 1


def test_pages_and_api_calls_of_one_token_share_its_request_limit(pipeline_factory: Any) -> None:
    pipeline = pipeline_factory(SLUICE_API_RATE_LIMIT_PER_MINUTE="6")
    deps = Dependencies(pipeline.settings, pipeline.pool, pipeline.redis, pipeline.broker, pipeline.limiter)
    dash = Dash(create_app(deps), pipeline)
    while time.time() % 60 > 50:  # the limit counts in minute windows: stay inside one
        time.sleep(1)
    token, browser = dash.user()  # signing in is no page of a session: not counted
    api = falcon.testing.TestClient(dash.app)
    bearer = {"Authorization": f"Bearer {token}"}
    answers = [browser.get("/runs").status_code for _ in range(3)]
    answers += [api.simulate_get("/api/runs", headers=bearer).status_code for _ in range(3)]
    assert answers == [200] * 6
    refused = browser.get("/runs")
    assert refused.status_code == 429
    assert "Retry-After" in refused.headers
    assert "text/html" in refused.headers["content-type"]
    assert api.simulate_get("/api/runs", headers=bearer).status_code == 429
    # Another token has its own budget.
    _, other = dash.user()
    assert other.get("/runs").status_code == 200


def test_bulk_retry_queues_the_failed_runs_of_the_selection_again(dash: Dash) -> None:
    token, browser = dash.user()
    url = create_workflow(browser, GOOD).headers["location"]
    wf = url.rsplit("/", 1)[1]
    with dash.pipeline.pool.connection() as conn:
        owner = users.authenticate(conn, token).id
        for status in ("failed", "failed", "succeeded"):
            conn.execute(
                "INSERT INTO runs (workflow_id, owner_id, workflow_version, trigger_type, status, attempt, "
                "max_attempts, started_at, finished_at, error) "
                "VALUES (%s, %s, 1, 'manual', %s, 1, 1, now(), now(), %s)",
                (wf, owner, status, "boom" if status == "failed" else None),
            )
    done = browser.post("/runs/bulk", {"csrf_token": browser.csrf(), "action": "retry", "workflow": wf})
    assert done.status_code == 303
    assert "Retried 2 run(s)." in browser.get(done.headers["location"]).text
    with dash.pipeline.pool.connection() as conn:
        rows = conn.execute("SELECT status::text AS s FROM runs WHERE workflow_id = %s ORDER BY 1", (wf,)).fetchall()
    assert [r["s"] for r in rows] == ["queued", "queued", "succeeded"]
    # Nothing is left to retry: a second go does nothing.
    again = browser.post("/runs/bulk", {"csrf_token": browser.csrf(), "action": "retry", "workflow": wf})
    assert "Retried 0 run(s)." in browser.get(again.headers["location"]).text


def test_deleting_a_workflow_cancels_its_waiting_runs_and_keeps_them_readable(dash: Dash) -> None:
    _, browser = dash.user()
    url = create_workflow(browser, GOOD).headers["location"]
    run_url = browser.post(f"{url}/run", {"csrf_token": browser.csrf(), "delay": "600000"}).headers["location"]
    deleted = browser.post(f"{url}/delete", {"csrf_token": browser.csrf()})
    assert deleted.status_code == 303
    assert "Workflow deleted." in browser.get(deleted.headers["location"]).text
    assert browser.get(url).status_code == 404
    run = browser.get(run_url)
    assert run.status_code == 200
    assert 'class="badge s-cancelled"' in run.text
    assert "a deleted workflow" in run.text
