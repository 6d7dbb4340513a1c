"""The dashboard without a server: vendored files, its route table, templates, and how it shows data."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from importlib import resources

import jinja2
import pytest

from sluice_api.dashboard import routes, views
from sluice_api.dashboard.sessions import csrf_token
from sluice_api.dashboard.web import Page, safe_next, template_environment
from sluice_api.routes import ROUTES
from sluice_common.runs import QueueMinute
from sluice_common.workflow import validate_workflow

STATIC = resources.files("sluice_api.dashboard") / "static"

# Third-party files, vendored at a pinned version: a changed byte is a failure until the new
# version's checksum is written here on purpose.
VENDORED = {
    "vendor/htmx-2.0.11.min.js": "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717",
    "vendor/htmx-2.0.11.LICENSE": "d3d2456f76414f2456104660ebd65aff1c04cd7966b942bdabd63f3cdb316a38",
}


@pytest.mark.parametrize("name", sorted(VENDORED))
def test_vendored_files_are_the_pinned_ones(name: str) -> None:
    assert hashlib.sha256((STATIC / name).read_bytes()).hexdigest() == VENDORED[name]


def test_every_vendored_file_has_its_checksum_and_licence() -> None:
    present = {f"vendor/{f.name}" for f in (STATIC / "vendor").iterdir()}
    assert present == set(VENDORED)
    for name in present:
        if name.endswith(".js"):
            assert name.removesuffix(".min.js") + ".LICENSE" in present


def test_the_pages_use_only_vendored_and_own_scripts() -> None:
    base = (resources.files("sluice_api.dashboard") / "templates" / "base.html").read_text()
    assert "http://" not in base
    assert "https://" not in base
    for name in ("vendor/htmx-2.0.11.min.js", "dashboard.js", "dashboard.css"):
        assert f"static('{name}')" in base


def test_the_dashboard_and_the_api_share_no_url() -> None:
    pages = [r.template for r in routes.PAGES]
    assert len(pages) == len(set(pages))
    assert not any(p.startswith(("/api", "/static", "/metrics")) for p in pages)
    assert all(r.template.startswith("/api/") for r in ROUTES)


@pytest.mark.parametrize("route", routes.PAGES, ids=[r.template for r in routes.PAGES])
def test_every_page_answers_something_and_is_a_page(route: routes.PageRoute) -> None:
    assert issubclass(route.page, Page)
    assert {n for n in dir(route.page) if n.startswith("on_")} <= {"on_get", "on_post"}
    assert any(n.startswith("on_") for n in dir(route.page))


def test_only_the_sign_in_page_is_open_without_a_session() -> None:
    assert [r.template for r in routes.PAGES if not r.page.signed_in] == ["/login"]


def test_every_template_compiles() -> None:
    env = template_environment()
    names = env.list_templates()
    assert "base.html" in names
    assert len(names) >= 10
    for name in names:
        env.get_template(name)


def test_templates_escape_what_they_show() -> None:
    env = template_environment()
    text = env.get_template("error.html").render(
        session=None,
        csrf="",
        csrf_header="X",
        nav="",
        flash=None,
        path="/",
        status=404,
        title="t",
        detail="<script>alert(1)</script>",
    )
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;" in text
    with pytest.raises(jinja2.UndefinedError):
        env.get_template("error.html").render()


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/runs?status=failed", "/runs?status=failed"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("", "/"),
        (None, "/"),
    ],
)
def test_after_sign_in_only_local_paths(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def test_the_csrf_token_is_stable_per_session_and_differs_between_sessions() -> None:
    assert csrf_token("a" * 43) == csrf_token("a" * 43)
    assert csrf_token("a" * 43) != csrf_token("b" * 43)
    assert "a" * 43 not in csrf_token("a" * 43)


def test_cron_in_words_and_the_next_fire() -> None:
    assert views.cron_words("*/5 * * * *") == "Every 5 minutes"
    now = datetime(2030, 1, 7, 8, 0, tzinfo=UTC)  # a Monday
    view = views.trigger_view({"type": "cron", "config": {"schedule": "0 9 * * 1-5", "timezone": "UTC"}}, True, now)
    assert view.next_fire == datetime(2030, 1, 7, 9, 0, tzinfo=UTC)
    assert "09:00" in view.words
    assert "(UTC)" in view.words
    assert views.trigger_view({"type": "cron", "config": {"schedule": "0 9 * * *"}}, False, now).next_fire is None
    assert views.trigger_view({"type": "webhook"}, True).words == "Webhook"


def test_the_timeline_places_each_step_by_its_start_and_length() -> None:
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    steps = [
        {"step_id": "a", "status": "succeeded", "started_at": t0, "finished_at": t0 + timedelta(seconds=1)},
        {
            "step_id": "b",
            "status": "succeeded",
            "started_at": t0 + timedelta(seconds=1),
            "finished_at": t0 + timedelta(seconds=4),
        },
        {"step_id": "c", "status": "pending", "started_at": None, "finished_at": None},
    ]
    a, b, c = views.timeline(steps, t0, now=t0 + timedelta(seconds=10))
    assert (a.left, a.width, a.seconds) == (0.0, 25.0, 1.0)
    assert (b.left, b.width, b.seconds) == (25.0, 75.0, 3.0)
    assert (c.width, c.seconds) == (0.0, None)
    running = views.timeline(
        [{"step_id": "a", "status": "running", "started_at": t0, "finished_at": None}],
        t0,
        now=t0 + timedelta(seconds=2),
    )[0]
    assert (running.width, running.seconds) == (100.0, 2.0)


def test_the_diff_of_two_versions() -> None:
    old = {"name": "a", "steps": [1]}
    new = {"name": "b", "steps": [1]}
    lines = views.diff(old, new, "v1", "v2")
    assert [(line.kind, line.text) for line in lines if line.kind in ("add", "del")] == [
        ("del", '-  "name": "a",'),
        ("add", '+  "name": "b",'),
    ]
    assert views.diff(old, old, "v1", "v1") == []


def test_the_chart_scales_to_its_peak() -> None:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    history = [QueueMinute(at + timedelta(minutes=i), depth, 0, 0, 0) for i, depth in enumerate([0, 5, 10])]
    chart = views.chart(history, ["depth"], width=100, height=52)
    assert chart.peak == 10
    assert chart.series == [("depth", "0.0,50.0 50.0,26.0 100.0,2.0")]


def test_times_and_durations_read_well() -> None:
    now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    assert views.ago(now - timedelta(seconds=90), now) == "1 min ago"
    assert views.ago(now + timedelta(hours=2), now) == "in 2 h"
    assert views.duration(0.25) == "250 ms"
    assert views.duration(75) == "1 min 15 s"
    assert views.parse_utc_input("2030-01-31T08:00") == datetime(2030, 1, 31, 8, 0, tzinfo=UTC)
    assert views.parse_utc_input("not a time") is None


@pytest.mark.parametrize("key", sorted(views.EXAMPLES))
def test_the_examples_are_valid_workflows(key: str) -> None:
    validate_workflow(views.EXAMPLES[key][1])
