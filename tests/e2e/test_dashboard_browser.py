"""The dashboard in a real Chromium (Playwright), on ``sluice dev`` as a new user starts it.

The browser is Debian's ``chromium`` (Playwright's own download is not used). Without one these
tests skip with a message, except in CI (``CI`` set), where a missing browser is a failure:
``.ci/run`` installs it. ``SLUICE_SCREENSHOT_DIR`` saves the pages' screenshots (light and dark)
there, as committed under ``docs/screenshots``; by default they go to the test's temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from sluice_common import users
from tests.conftest import Servers, process_env
from tests.e2e.helpers import free_port, stop, wait_for

playwright = pytest.importorskip("playwright.sync_api")
Page = playwright.Page
expect = playwright.expect

BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
WAIT_MS = 30_000


def chromium_path() -> str:
    found = [os.environ.get("SLUICE_TEST_CHROMIUM", ""), *BROWSERS, shutil.which("chromium") or ""]
    for path in found:
        if path and os.access(path, os.X_OK):
            return path
    message = "no Chromium found (Debian's package chromium, or SLUICE_TEST_CHROMIUM=/path)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}: CI must run the browser tests (.ci/run installs it)")
    pytest.skip(f"{message}: the browser tests are skipped")


@dataclass
class Dev:
    """``sluice dev`` on the test servers: its URL, its dev token and its database."""

    base: str
    token: str
    database_url: str

    def new_user(self) -> str:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            return users.create_user(conn, f"u{uuid.uuid4().hex[:10]}").token

    def api(self, token: str) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {token}"}, timeout=15)


@pytest.fixture(scope="module")
def dev(
    servers: Servers, module_database: str, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Dev]:
    chromium_path()  # skip (or fail in CI) before starting anything
    port = free_port()
    data = tmp_path_factory.mktemp("dev")
    env = process_env(
        module_database,
        servers.redis_url,
        f"{redis_prefix}_dash{port}",
        SLUICE_DATA_DIR=str(data),
        SLUICE_API_BIND=f"127.0.0.1:{port}",
        SLUICE_API_RATE_LIMIT_PER_MINUTE="100000",
        SLUICE_RATE_LIMIT_PER_MINUTE="100000",
        SLUICE_RETRY_BACKOFF_MIN_MS="50",
        SLUICE_RETRY_BACKOFF_MAX_MS="100",
    )
    log = (data / "dev.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "sluice_cli", "dev"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/api/ready", proc=proc)
        yield Dev(base, (data / "dev-token").read_text().strip(), module_database)
    finally:
        stop(proc)
        log.close()


@pytest.fixture(scope="module")
def browser(dev: Dev) -> Iterator[Any]:
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=chromium_path())
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    yield context.new_page()
    context.close()


def sign_in(page: Page, dev: Dev, token: str) -> None:
    page.goto(f"{dev.base}/")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Workflows")).to_be_visible()


def create(page: Page, dev: Dev, definition: str) -> str:
    """Create a workflow in the editor; returns its page's URL."""
    page.goto(f"{dev.base}/workflows/new")
    page.get_by_label("Definition (JSON)").fill(definition)
    page.get_by_role("button", name="Create").click()
    expect(page).to_have_url(re.compile(r"/workflows/[0-9a-f-]{36}$"))
    return page.url


def mark_no_reload(page: Page) -> None:
    """A value in the page's window: it survives updates in place, not a reload."""
    page.evaluate("window.__sluiceNoReload = true")


def assert_no_reload(page: Page) -> None:
    assert page.evaluate("window.__sluiceNoReload === true")


def run_status(page: Page) -> Any:
    return page.locator("#run-status .badge")


def manual(name: str, steps: str, settings: str = "{}") -> str:
    return f'{{"name": "{name}", "trigger": {{"type": "manual"}}, "steps": {steps}, "settings": {settings}}}'


def test_sign_in_edit_with_a_problem_fix_run_live_and_sign_out(page: Page, dev: Dev) -> None:
    sign_in(page, dev, dev.token)
    expect(page.locator(".who .user")).to_have_text("dev")

    page.goto(f"{dev.base}/workflows/new")
    editor = page.get_by_label("Definition (JSON)")
    editor.fill(manual("live", '[{"id": "wait", "type": "delay", "config": {"seconds": "soon"}}]'))
    page.get_by_role("button", name="Create").click()
    problem = page.locator("#problems li", has=page.locator("code.path", has_text="$.steps[0].config.seconds"))
    expect(problem).to_be_visible()
    # The text as sent is kept for fixing.
    expect(editor).to_have_value(re.compile('"soon"'))
    editor.fill(
        manual(
            "live",
            '[{"id": "wait", "type": "delay", "config": {"seconds": 2}},'
            ' {"id": "done", "type": "transform", "config": {"value": {"ok": true}}}]',
        )
    )
    page.get_by_role("button", name="Create").click()
    expect(page).to_have_url(re.compile(r"/workflows/[0-9a-f-]{36}$"))
    expect(page.get_by_text("version 1", exact=False).first).to_be_visible()

    page.get_by_label("Trigger data (JSON, optional)").fill('{"userId": "123"}')
    page.get_by_label("Priority (1 first, 10 last)").select_option("2")
    page.get_by_role("button", name="Run now").click()
    expect(page).to_have_url(re.compile(r"/runs/[0-9a-f-]{36}$"))
    mark_no_reload(page)
    expect(run_status(page)).not_to_have_text("succeeded", timeout=1000)  # still going: a delay of 2 s
    expect(run_status(page)).to_have_text("succeeded")
    assert_no_reload(page)
    expect(page.locator(".timeline .step")).to_have_count(2)
    expect(page.locator("pre", has_text='"userId": "123"')).to_be_visible()
    expect(page.locator("#trace-id")).to_have_text(re.compile(r"^[0-9a-f]{32}$|^—$"))

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto(f"{dev.base}/runs")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Fruns$"))


def test_cancel_a_delayed_run_and_retry_a_failed_one(page: Page, dev: Dev) -> None:
    sign_in(page, dev, dev.new_user())
    url = create(page, dev, manual("later", '[{"id": "a", "type": "transform", "config": {"value": 1}}]'))
    page.get_by_label("Delay (ms)").fill("600000")
    page.get_by_role("button", name="Run now").click()
    expect(run_status(page)).to_have_text("delayed")
    page.get_by_role("button", name="Cancel").click()
    expect(run_status(page)).to_have_text("cancelled")
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)

    create(
        page,
        dev,
        manual("broken", '[{"id": "boom", "type": "fail", "config": {"message": "it broke"}}]', '{"maxAttempts": 1}'),
    )
    page.get_by_role("button", name="Run now").click()
    mark_no_reload(page)
    expect(run_status(page)).to_have_text("failed")
    assert_no_reload(page)
    expect(page.locator(".step .problem")).to_have_text(re.compile("it broke"))
    page.get_by_role("button", name="Retry").click()
    expect(page.locator(".flash")).to_have_text("Queued again.")
    # A new attempt on the same version, which fails the same way.
    expect(page.locator("table tbody tr", has_text="it broke")).to_have_count(2)
    expect(run_status(page)).to_have_text("failed")
    assert url  # the first workflow's page was reached


def test_filter_the_runs_list(page: Page, dev: Dev) -> None:
    token = dev.new_user()
    sign_in(page, dev, token)
    ok = create(page, dev, manual("fine", '[{"id": "a", "type": "transform", "config": {"value": 1}}]'))
    bad = create(
        page, dev, manual("bad", '[{"id": "b", "type": "fail", "config": {"message": "no"}}]', '{"maxAttempts": 1}')
    )
    for url in (ok, ok, bad):
        page.goto(url)
        page.get_by_role("button", name="Run now").click()
        expect(run_status(page)).to_have_text(re.compile("succeeded|failed"))

    page.goto(f"{dev.base}/runs")
    rows = page.locator("#runs-table tbody tr")
    expect(rows).to_have_count(3)
    # The first page follows new runs live.
    mark_no_reload(page)
    with dev.api(token) as api:
        api.post(f"/api/workflows/{ok.rsplit('/', 1)[1]}/run", json={"delay": 600_000})
    expect(rows).to_have_count(4)
    expect(rows.first).to_contain_text("delayed")
    assert_no_reload(page)
    page.get_by_label("Status", exact=True).select_option("failed")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"status=failed"))
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("bad")
    expect(rows.first).to_contain_text("failed")
    page.get_by_label("Status", exact=True).select_option("")
    page.get_by_label("Workflow", exact=True).select_option(label="fine")
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(3)
    expect(rows.filter(has_text="succeeded")).to_have_count(2)
    expect(rows.filter(has_text="delayed")).to_have_count(1)
    # Bulk: cancel everything this filter selects (the one delayed run of "fine").
    page.get_by_role("button", name="Cancel all").click()
    expect(page.locator(".flash")).to_have_text("Cancelled 1 run(s).")
    expect(rows.filter(has_text="cancelled")).to_have_count(1)
    expect(rows.filter(has_text="succeeded")).to_have_count(2)


def test_the_queue_numbers_move_without_a_reload(page: Page, dev: Dev) -> None:
    token = dev.new_user()
    sign_in(page, dev, token)
    page.goto(f"{dev.base}/queue")
    delayed = page.locator("#q-delayed")
    before = int(delayed.inner_text())
    mark_no_reload(page)
    with dev.api(token) as api:
        wf = api.post(
            "/api/workflows",
            json={
                "name": "q",
                "trigger": {"type": "manual"},
                "steps": [{"id": "a", "type": "transform", "config": {"value": 1}}],
            },
        ).json()["id"]
        runs = [api.post(f"/api/workflows/{wf}/run", json={"delay": 600_000}).json()["runId"] for _ in range(3)]
        expect(delayed).to_have_text(str(before + 3))
        for run in runs:
            api.post(f"/api/runs/{run}/cancel")
    expect(delayed).to_have_text(str(before))
    assert_no_reload(page)
    # The pause toggle stops the polling.
    page.get_by_label("Live").uncheck()
    with dev.api(token) as api:
        run = api.post(f"/api/workflows/{wf}/run", json={"delay": 600_000}).json()["runId"]
        page.wait_for_timeout(4500)
        expect(delayed).to_have_text(str(before))
        page.get_by_label("Live").check()
        expect(delayed).to_have_text(str(before + 1))
        api.post(f"/api/runs/{run}/cancel")


def test_another_users_run_is_a_404_page(browser: Any, page: Page, dev: Dev) -> None:
    owner = dev.new_user()
    with dev.api(owner) as api:
        wf = api.post(
            "/api/workflows",
            json={
                "name": "mine",
                "trigger": {"type": "manual"},
                "steps": [{"id": "a", "type": "transform", "config": {"value": 1}}],
            },
        ).json()["id"]
        run = api.post(f"/api/workflows/{wf}/run").json()["runId"]
    sign_in(page, dev, dev.new_user())
    answer = page.goto(f"{dev.base}/runs/{run}")
    assert answer is not None
    assert answer.status == 404
    expect(page.get_by_role("heading", name=re.compile("404"))).to_be_visible()
    answer = page.goto(f"{dev.base}/workflows/{wf}")
    assert answer is not None
    assert answer.status == 404


def test_a_form_post_without_the_csrf_token_is_refused(page: Page, dev: Dev) -> None:
    sign_in(page, dev, dev.new_user())
    page.goto(f"{dev.base}/secrets")
    refused = page.request.post(f"{dev.base}/secrets", form={"name": "FORGED", "value": "v"}, max_redirects=0)
    assert refused.status == 403
    token = page.locator("input[name=csrf_token]").first.input_value()
    accepted = page.request.post(
        f"{dev.base}/secrets", form={"name": "REAL", "value": "v", "csrf_token": token}, max_redirects=0
    )
    assert accepted.status == 303
    page.reload()
    expect(page.locator("table")).to_contain_text("REAL")
    expect(page.locator("table")).not_to_contain_text("FORGED")
    # And through the form itself: set, then delete.
    page.get_by_label("Name").fill("FROM_FORM")
    page.get_by_label("Value").fill("secret value")
    page.get_by_role("button", name="Save").click()
    expect(page.locator(".flash")).to_have_text("Secret FROM_FORM saved.")
    page.get_by_role("button", name="Delete FROM_FORM").click()
    expect(page.locator("table")).not_to_contain_text("FROM_FORM")


def test_narrow_screens_dark_mode_focus_and_screenshots(browser: Any, dev: Dev, tmp_path: Path) -> None:
    shots = Path(os.environ.get("SLUICE_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    token = dev.new_user()
    with dev.api(token) as api:
        wf = api.post(
            "/api/workflows",
            json={
                "name": "nightly report",
                "trigger": {"type": "cron", "config": {"schedule": "0 2 * * *", "timezone": "Europe/Paris"}},
                "steps": [
                    {"id": "fetch", "type": "transform", "config": {"value": {"rows": 42}}},
                    {"id": "pause", "type": "delay", "config": {"seconds": 1}},
                    {"id": "report", "type": "transform", "config": {"value": "{{ steps.fetch.rows }}"}},
                ],
            },
        ).json()["id"]
        api.post(f"/api/workflows/{wf}/run", json={"triggerData": {"day": "2030-01-31"}})
        failing = api.post(
            "/api/workflows",
            json={
                "name": "flaky call",
                "trigger": {"type": "manual"},
                "settings": {"maxAttempts": 1},
                "steps": [{"id": "call", "type": "fail", "config": {"message": "upstream said 503"}}],
            },
        ).json()["id"]
        api.post(f"/api/workflows/{failing}/run")
        run = api.post(f"/api/workflows/{wf}/run", json={"priority": 1}).json()["runId"]
        api.put("/api/secrets/REPORT_TOKEN", json={"value": "x"})

    pages = {
        "workflows": "/",
        "workflow": f"/workflows/{wf}",
        "run": f"/runs/{run}",
        "runs": "/runs",
        "queue": "/queue",
    }
    for scheme in ("light", "dark"):
        context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme=scheme)
        context.set_default_timeout(WAIT_MS)
        page = context.new_page()
        sign_in(page, dev, token)
        page.goto(f"{dev.base}/runs/{run}")
        expect(run_status(page)).to_have_text("succeeded")
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        # The system setting decides: a dark background in dark mode, a light one otherwise.
        level = sum(int(v) for v in re.findall(r"\d+", background)[:3])
        assert (level < 200) == (scheme == "dark"), background
        for name, path in pages.items():
            page.goto(f"{dev.base}{path}")
            page.screenshot(path=str(shots / f"{name}-{scheme}.png"))
        context.close()

    narrow = browser.new_context(viewport={"width": 375, "height": 800})
    narrow.set_default_timeout(WAIT_MS)
    page = narrow.new_page()
    sign_in(page, dev, token)
    for path in pages.values():
        page.goto(f"{dev.base}{path}")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, (path, width)
    # Keyboard focus is visible: the focused control draws an outline.
    page.goto(f"{dev.base}/")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none")
    # Every form control has a label.
    for path in pages.values():
        page.goto(f"{dev.base}{path}")
        unlabelled = page.evaluate(
            """[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
                 .filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id || e.name)"""
        )
        assert unlabelled == [], (path, unlabelled)
    narrow.close()
