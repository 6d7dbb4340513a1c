"""Metrics: the run-events seam, the observers, the queue collector, the exposition promtool checks."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import falcon
import falcon.testing
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sluice_api import multiproc
from sluice_api.app import Dependencies, create_app
from sluice_api.metrics import HttpMetrics
from sluice_common import runstate
from sluice_common.metrics import QueueDepthCollector, RunMetrics, observe_runs
from sluice_common.observe import BaseRunObserver, RunCreated, RunEnded, RunEvents, RunStarted, StepEnded
from sluice_common.runs import QueueStats
from sluice_common.settings import load_settings
from sluice_scheduler.hooks import SchedulerEvents
from sluice_scheduler.metrics import SchedulerMetrics
from sluice_worker.claims import Claimed
from sluice_worker.metrics import WorkerThreadMetrics
from sluice_worker.observing import ObservedSteps, ended_as
from sluice_worker.outcomes import Finish
from tests.tools import need_binary


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def stats(waiting: int = 3) -> QueueStats:
    return QueueStats(
        waiting=waiting,
        active=2,
        completed=7,
        failed=1,
        delayed=4,
        waiting_by_priority={1: 1, 5: waiting - 1},
        concurrency=10,
        rate_limit_per_minute=100,
        rate_used=9,
        redis=True,
        extra={"waitingOnSubWorkflows": 5},
    )


class Recorder(BaseRunObserver):
    def __init__(self) -> None:
        self.events: list[Any] = []

    def run_created(self, event: RunCreated) -> None:
        self.events.append(event)


class Broken(BaseRunObserver):
    def run_created(self, event: RunCreated) -> None:
        raise RuntimeError("observer bug")


def test_an_observer_that_raises_does_not_stop_the_others() -> None:
    events = RunEvents()
    recorder = Recorder()
    events.add(Broken())
    events.add(recorder)
    event = RunCreated("r1", "w1", "manual")
    events.created(event)
    events.created(event)
    assert recorder.events == [event, event]
    events.remove(recorder)
    events.created(event)
    assert len(recorder.events) == 2


def test_run_metrics_count_each_event_by_trigger() -> None:
    registry = CollectorRegistry()
    events = RunEvents()
    observe_runs(registry, load_settings({}), events)
    events.created(RunCreated("r1", "w1", "manual"))
    events.created(RunCreated("r2", "w1", "cron"))
    events.started(RunStarted("r1", "w1", "manual", 1, 0.25))
    events.step_ended(StepEnded("r1", "w1", "s", "transform", "succeeded", 0.01))
    for outcome in ("succeeded", "failed", "retried", "cancelled", "parked", "lost"):
        events.ended(RunEnded("r1", "w1", "manual", 1, outcome, 1.5))
    events.rate_limited(500)
    assert value(registry, "sluice_runs_created_total", trigger="manual") == 1
    assert value(registry, "sluice_runs_created_total", trigger="cron") == 1
    assert value(registry, "sluice_runs_started_total", trigger="manual") == 1
    for counter in ("succeeded", "failed", "retried", "cancelled"):
        assert value(registry, f"sluice_runs_{counter}_total", trigger="manual") == 1
    assert value(registry, "sluice_run_queue_wait_seconds_count", trigger="manual") == 1
    assert value(registry, "sluice_run_queue_wait_seconds_sum", trigger="manual") == 0.25
    assert value(registry, "sluice_run_duration_seconds_count", trigger="manual", outcome="parked") == 1
    assert value(registry, "sluice_step_duration_seconds_count", type="transform", status="succeeded") == 1
    assert value(registry, "sluice_rate_limited_wakeups_total") == 1


def test_workflow_labels_only_when_turned_on() -> None:
    off = CollectorRegistry()
    RunMetrics(off).run_created(RunCreated("r1", "w1", "manual"))
    assert value(off, "sluice_runs_created_total", trigger="manual") == 1
    on = CollectorRegistry()
    settings = load_settings({"SLUICE_METRICS_WORKFLOW_LABELS": "true"})
    observe_runs(on, settings, RunEvents()).run_created(RunCreated("r1", "w1", "manual"))
    assert value(on, "sluice_runs_created_total", trigger="manual") is None
    assert value(on, "sluice_runs_created_total", trigger="manual", workflow="w1") == 1


def test_queue_collector_reports_the_stats_and_queries_once_a_second() -> None:
    calls: list[int] = []
    now = [100.0]

    def read() -> QueueStats:
        calls.append(1)
        return stats(waiting=3 + len(calls))

    registry = CollectorRegistry()
    registry.register(QueueDepthCollector(read, lambda: 2, clock=lambda: now[0]))
    assert value(registry, "sluice_queue_waiting") == 4
    assert value(registry, "sluice_queue_active") == 2
    assert value(registry, "sluice_queue_delayed") == 4
    assert value(registry, "sluice_queue_waiting_subworkflows") == 5
    assert value(registry, "sluice_queue_waiting_by_priority", priority="1") == 1
    assert value(registry, "sluice_queue_waiting_by_priority", priority="10") == 0
    assert value(registry, "sluice_rate_limit_used") == 9
    assert value(registry, "sluice_runs_lease_expired") == 2
    assert value(registry, "sluice_queue_stats_up") == 1
    now[0] += 0.5
    assert value(registry, "sluice_queue_waiting") == 4  # cached
    assert len(calls) == 1
    now[0] += 0.6
    assert value(registry, "sluice_queue_waiting") == 5
    assert len(calls) == 2


def test_queue_collector_without_the_database_still_answers() -> None:
    def down() -> QueueStats:
        raise OSError("connection refused")

    registry = CollectorRegistry()
    registry.register(QueueDepthCollector(down, cache_seconds=0))
    assert value(registry, "sluice_queue_stats_up") == 0
    assert value(registry, "sluice_queue_waiting") is None


def claimed(steps: list[dict[str, Any]] | None = None) -> Claimed:
    return Claimed(
        run_id="r1",
        claim_id="c1",
        workflow_id="w1",
        owner_id="o1",
        attempt=1,
        max_attempts=3,
        priority=5,
        trigger_type="manual",
        trigger_data={},
        steps=steps if steps is not None else [{"id": "a", "type": "http"}, {"id": "b", "type": "transform"}],
        settings={},
        done_steps={},
    )


class NullStore:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def completed(self) -> dict[str, Any]:
        return {}

    def waiting(self) -> dict[str, Any]:
        return {}

    def succeeded(self, step_id: str, position: int, output: Any, started_at: datetime) -> None:
        self.calls.append(f"succeeded {step_id}")

    def parked(self, step_id: str, position: int, output: Any, started_at: datetime) -> None:
        self.calls.append(f"parked {step_id}")

    def failed(self, step_id: str, position: int, error: str, started_at: datetime) -> None:
        self.calls.append(f"failed {step_id}")

    def starting(self, step_id: str, position: int) -> None:
        self.calls.append(f"starting {step_id}")

    def interruption(self) -> None:
        return None


def test_observed_steps_store_first_then_report_type_and_duration() -> None:
    store = NullStore()
    seen: list[StepEnded] = []

    class Steps(BaseRunObserver):
        def step_ended(self, event: StepEnded) -> None:
            seen.append(event)

    events = RunEvents()
    events.add(Steps())
    observed = ObservedSteps(store, claimed(), events)
    earlier = datetime.now(UTC) - timedelta(seconds=2)
    observed.succeeded("a", 0, {}, earlier)
    observed.failed("b", 1, "boom", earlier)
    assert store.calls == ["succeeded a", "failed b"]
    assert [(e.step_type, e.status) for e in seen] == [("http", "succeeded"), ("transform", "failed")]
    assert all(1.9 < e.duration_seconds < 10 for e in seen)


@pytest.mark.parametrize(
    ("params", "updated", "expected"),
    [
        ({"status": "succeeded", "attempt_status": "succeeded"}, {"status": "succeeded"}, "succeeded"),
        ({"status": "failed", "attempt_status": "failed"}, {"status": "failed"}, "failed"),
        ({"status": "failed", "attempt_status": "failed"}, {"status": "cancelled"}, "cancelled"),
        ({"status": "delayed", "attempt_status": "failed"}, {"status": "delayed"}, "retried"),
        ({"status": "delayed", "attempt_status": "parked"}, {"status": "delayed"}, "parked"),
        ({"status": "waiting", "attempt_status": "parked"}, {"status": "waiting"}, "parked"),
        ({"status": "queued", "attempt_status": "cancelled"}, {"status": "queued"}, "handed_back"),
        ({"status": "succeeded", "attempt_status": "succeeded"}, None, "lost"),
    ],
)
def test_how_an_execution_ended(params: dict[str, Any], updated: dict[str, Any] | None, expected: str) -> None:
    assert ended_as(Finish(runstate.FINISH_MOVED, params), updated) == expected


def test_scheduler_metrics_follow_the_hooks() -> None:
    registry = CollectorRegistry()
    events = SchedulerEvents(SchedulerMetrics(registry))
    assert value(registry, "sluice_scheduler_leader") == 0
    events.leadership(True)
    events.slot_handled("w1", "fired", 0.2)
    events.slot_handled("w1", "skipped_overlap", 0.3)
    events.slots_missed("w1", 3)
    assert value(registry, "sluice_scheduler_leader") == 1
    assert value(registry, "sluice_scheduler_fires_total", outcome="fired") == 1
    assert value(registry, "sluice_scheduler_fires_total", outcome="skipped_overlap") == 1
    assert value(registry, "sluice_scheduler_missed_fires_total") == 3
    assert value(registry, "sluice_scheduler_fire_lateness_seconds_count") == 1


def test_worker_threads_busy_only_between_start_and_end() -> None:
    registry = CollectorRegistry()
    threads = WorkerThreadMetrics(registry, 8)
    assert value(registry, "sluice_worker_threads") == 8
    threads.after_skip_message(None, None)  # skipped by an earlier middleware before it started here
    assert value(registry, "sluice_worker_threads_busy") == 0
    threads.before_process_message(None, None)
    assert value(registry, "sluice_worker_threads_busy") == 1
    threads.after_process_message(None, None, result=None)
    threads.after_skip_message(None, None)
    assert value(registry, "sluice_worker_threads_busy") == 0


class Thing:
    def on_get(self, req: falcon.Request, resp: falcon.Response, thing_id: str) -> None:
        if thing_id == "missing":
            raise falcon.HTTPNotFound()
        resp.media = {"id": thing_id}


def test_http_metrics_by_route_template_and_status() -> None:
    registry = CollectorRegistry()
    app = falcon.App(middleware=[HttpMetrics(registry)])
    app.add_route("/things/{thing_id}", Thing())
    client = falcon.testing.TestClient(app)
    for path in ("/things/1", "/things/2", "/things/missing", "/nowhere"):
        client.simulate_get(path)
    assert value(registry, "sluice_http_requests_total", method="GET", route="/things/{thing_id}", status="200") == 2
    assert value(registry, "sluice_http_requests_total", method="GET", route="/things/{thing_id}", status="404") == 1
    assert value(registry, "sluice_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert value(registry, "sluice_http_request_duration_seconds_count", method="GET", route="/things/{thing_id}") == 3
    assert value(registry, "sluice_http_requests_in_flight") == 0


@pytest.mark.parametrize("on", [True, False])
def test_the_api_metrics_setting_turns_the_middleware_and_the_endpoint_on_or_off(on: bool) -> None:
    settings = load_settings({"SLUICE_API_METRICS": str(on).lower()})
    # Nothing here reaches the pool or the broker: /api/health is public, /metrics says the queue is down.
    deps = Dependencies(settings, cast(Any, None), None, cast(Any, None), cast(Any, None))
    registry = CollectorRegistry()
    client = falcon.testing.TestClient(create_app(deps, registry=registry))
    assert client.simulate_get("/api/health").status_code == 200
    scrape = client.simulate_get("/metrics")
    counted = value(registry, "sluice_http_requests_total", method="GET", route="/api/health", status="200")
    if on:
        assert scrape.status_code == 200
        assert counted == 1
        assert "sluice_queue_stats_up 0.0" in scrape.text
    else:
        assert scrape.status_code == 404
        assert counted is None
        assert not list(registry.collect())


def test_prepare_directory_makes_or_empties_it(tmp_path: Any) -> None:
    env: dict[str, str] = {}
    made = multiproc.prepare_directory(env)
    assert env[multiproc.ENV] == made
    assert os.path.isdir(made)
    os.rmdir(made)
    given = tmp_path / "mp"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"stale")
    (given / "keep.txt").write_text("not ours")
    assert multiproc.prepare_directory({multiproc.ENV: str(given)}) == str(given)
    assert sorted(p.name for p in given.iterdir()) == ["keep.txt"]


def test_dead_workers_are_marked_at_scrape_time(tmp_path: Any) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for pid in (gone.pid, os.getpid()):
        (tmp_path / f"gauge_livesum_{pid}.db").write_bytes(b"")
        (tmp_path / f"counter_{pid}.db").write_bytes(b"")
    assert multiproc.mark_dead_workers(str(tmp_path)) == [gone.pid]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{gone.pid}.db", f"counter_{os.getpid()}.db", f"gauge_livesum_{os.getpid()}.db"]
    )


def every_metric() -> bytes:
    """The exposition of every Sluice metric, each with a sample."""
    registry = CollectorRegistry()
    events = RunEvents()
    observe_runs(registry, load_settings({}), events)
    events.created(RunCreated("r1", "w1", "manual"))
    events.started(RunStarted("r1", "w1", "manual", 1, 0.1))
    events.step_ended(StepEnded("r1", "w1", "s", "http", "succeeded", 0.1))
    events.ended(RunEnded("r1", "w1", "manual", 1, "succeeded", 0.2))
    events.rate_limited(10)
    SchedulerEvents(SchedulerMetrics(registry)).slot_handled("w1", "fired", 0.1)
    WorkerThreadMetrics(registry, 4)
    app = falcon.App(middleware=[HttpMetrics(registry)])
    falcon.testing.TestClient(app).simulate_get("/x")
    registry.register(QueueDepthCollector(stats, lambda: 0))
    return generate_latest(registry)


def test_every_metric_is_prefixed_and_promtool_finds_nothing_to_say() -> None:
    text = every_metric().decode()
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert len(names) > 20
    assert all(name.startswith("sluice_") for name in names), sorted(names)
    promtool = need_binary("promtool")
    done = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert done.returncode == 0, done
    assert not done.stdout.strip(), done.stdout  # lint findings (names, units, help) are printed
    assert not done.stderr.strip(), done.stderr
