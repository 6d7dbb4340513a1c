"""Metrics: the run-events seam, the observers, the queue collector, the exposition promtool checks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import falcon
import falcon.testing
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

from sluice_api import multiproc
from sluice_api.app import Dependencies, create_app
from sluice_api.metrics import LATENCY_BUCKETS, HttpMetrics, MetricsResource, RunsCreatedTally
from sluice_common import runstate
from sluice_common.metrics import QueueDepthCollector, RunMetrics, observe_runs
from sluice_common.observe import (
    BaseRunObserver,
    RunCancelled,
    RunCreated,
    RunEnded,
    RunEvents,
    RunStarted,
    StepEnded,
    StepStarted,
)
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


def test_ends_reach_the_observers_in_reverse_order_as_scopes_unwind() -> None:
    heard: list[str] = []

    class Scope(BaseRunObserver):
        def __init__(self, name: str) -> None:
            self.name = name

        def run_started(self, event: RunStarted) -> None:
            heard.append(f"{self.name} run+")

        def step_started(self, event: StepStarted) -> None:
            heard.append(f"{self.name} step+")

        def step_ended(self, event: StepEnded) -> None:
            heard.append(f"{self.name} step-")

        def run_ended(self, event: RunEnded) -> None:
            heard.append(f"{self.name} run-")

    events = RunEvents()
    events.add(Scope("outer"))
    events.add(Scope("inner"))
    events.started(RunStarted("r", "w", "manual", 1, None))
    events.step_started(StepStarted("r", "w", "a", "http", 1, 0))
    events.step_ended(StepEnded("r", "w", "a", "http", "succeeded", 0.1, 1))
    events.ended(RunEnded("r", "w", "manual", 1, "succeeded", 0.2))
    assert heard == [
        "outer run+", "inner run+", "outer step+", "inner step+",
        "inner step-", "outer step-", "inner run-", "outer run-",
    ]  # fmt: skip


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


class Clock:
    """``perf_counter`` for HttpMetrics: every request starts at 0 and takes the next duration."""

    def __init__(self, durations: list[float]) -> None:
        self._times = iter([t for d in durations for t in (0.0, d)])

    def __call__(self) -> float:
        return next(self._times)


# Bucket bounds themselves (a bound counts in its own bucket), between them, past the last.
DURATIONS = [0.0, 0.0005, 0.001, 0.0011, 0.0025, 0.003, 0.049, 0.05, 1.0, 9.99, 10.0, 10.5, 60.0]


def test_http_latency_tally_is_what_observe_would_record() -> None:
    registry = CollectorRegistry()
    app = falcon.App(middleware=[HttpMetrics(registry, clock=Clock(DURATIONS))])
    app.add_route("/things/{thing_id}", Thing())
    client = falcon.testing.TestClient(app)
    for i in range(len(DURATIONS)):
        client.simulate_get(f"/things/{i}")
    reference = CollectorRegistry()
    histogram = Histogram(
        "sluice_http_request_duration_seconds", "", ("method", "route"), buckets=LATENCY_BUCKETS, registry=reference
    )
    for d in DURATIONS:
        histogram.labels("GET", "/things/{thing_id}").observe(d)

    def samples(r: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for m in r.collect()
            if m.name == "sluice_http_request_duration_seconds"
            for s in m.samples
            if not s.name.endswith("_created")
        }

    assert samples(registry) == samples(reference)
    assert value(registry, "sluice_http_requests_total", method="GET", route="/things/{thing_id}", status="200") == len(
        DURATIONS
    )


@pytest.fixture
def multiprocess_dir(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Prometheus multiprocess mode in this process, as a gunicorn worker has it, in ``tmp_path``."""
    monkeypatch.setenv(multiproc.ENV, str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    return str(tmp_path)


def from_files(path: str, name: str, **labels: str) -> float | None:
    """What a scrape reads: the values every process wrote to ``path``."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return registry.get_sample_value(name, labels)


def test_http_metrics_reach_the_multiprocess_files_at_a_flush(multiprocess_dir: str) -> None:
    metrics = HttpMetrics(CollectorRegistry())
    app = falcon.App(middleware=[metrics])
    app.add_route("/things/{thing_id}", Thing())
    client = falcon.testing.TestClient(app)
    for path in ("/things/1", "/things/2", "/things/missing"):
        client.simulate_get(path)
    route = {"method": "GET", "route": "/things/{thing_id}"}
    assert from_files(multiprocess_dir, "sluice_http_requests_total", **route, status="200") is None
    metrics.flush()
    assert from_files(multiprocess_dir, "sluice_http_requests_total", **route, status="200") == 2
    assert from_files(multiprocess_dir, "sluice_http_requests_total", **route, status="404") == 1
    assert from_files(multiprocess_dir, "sluice_http_request_duration_seconds_count", **route) == 3
    assert from_files(multiprocess_dir, "sluice_http_requests_in_flight") == 0
    client.simulate_get("/things/3")
    metrics.flush()
    metrics.flush()  # an empty tally adds nothing
    assert from_files(multiprocess_dir, "sluice_http_requests_total", **route, status="200") == 3
    assert from_files(multiprocess_dir, "sluice_http_request_duration_seconds_count", **route) == 4

    # A worker's flusher does it every so often on its own.
    flusher = multiproc.Flusher(multiprocess_dir, seconds=0.05)
    flusher.add(metrics.flush)
    flusher.start()
    try:
        client.simulate_get("/things/4")
        deadline = time.monotonic() + 10
        while from_files(multiprocess_dir, "sluice_http_requests_total", **route, status="200") != 4:
            assert time.monotonic() < deadline, "the flusher did not flush"
            time.sleep(0.05)
    finally:
        flusher.close()


class Created(BaseRunObserver):
    def __init__(self) -> None:
        self.events: list[Any] = []

    def run_created(self, event: RunCreated) -> None:
        self.events.append(event)


def test_a_scrape_has_every_worker_flush_first(multiprocess_dir: str) -> None:
    registry = CollectorRegistry()
    flusher = multiproc.Flusher(multiprocess_dir, seconds=3600)  # no flush but the ones asked for
    http = HttpMetrics(registry)
    runs = RunsCreatedTally(registry)
    flusher.add(http.flush)
    flusher.add(runs.flush)
    app = falcon.App(middleware=[http])
    app.add_route("/things/{thing_id}", Thing())
    app.add_route("/metrics", MetricsResource(registry, QueueDepthCollector(stats)))
    flusher.start()
    try:
        assert os.path.exists(os.path.join(multiprocess_dir, f"flush_{os.getpid()}.sock"))
        client = falcon.testing.TestClient(app)
        client.simulate_get("/things/1")
        runs.run_created(RunCreated("r1", "w1", "manual"))
        runs.run_created(RunCreated("r2", "w1", "webhook"))
        runs.run_created(RunCreated("r3", "w2", "manual"))
        assert from_files(multiprocess_dir, "sluice_runs_created_total", trigger="manual") is None
        scrape = client.simulate_get("/metrics").text
        assert 'sluice_http_requests_total{method="GET",route="/things/{thing_id}",status="200"} 1.0' in scrape
        assert 'sluice_runs_created_total{trigger="manual"} 2.0' in scrape
        assert 'sluice_runs_created_total{trigger="webhook"} 1.0' in scrape
        assert "sluice_queue_waiting 3.0" in scrape
        assert multiproc.request_flush(multiprocess_dir) == 1
    finally:
        flusher.close()
    assert not os.path.exists(os.path.join(multiprocess_dir, f"flush_{os.getpid()}.sock"))
    # The scrape itself, answered after its own flush, shows at the next one.
    assert from_files(multiprocess_dir, "sluice_http_requests_total", method="GET", route="/metrics", status="200") == 1


def test_the_runs_created_tally_forwards_the_other_events() -> None:
    registry = CollectorRegistry()
    runs = RunsCreatedTally(registry, workflow_labels=True)
    runs.run_created(RunCreated("r1", "w1", "manual"))
    runs.run_started(RunStarted("r1", "w1", "manual", 1, 0.5))
    runs.run_ended(RunEnded("r1", "w1", "manual", 1, "succeeded", 1.0))
    runs.step_ended(StepEnded("r1", "w1", "s", "http", "succeeded", 0.1))
    runs.rate_limited(10)
    runs.run_cancelled(RunCancelled("r2", "w1", "manual"))
    assert value(registry, "sluice_runs_cancelled_total", trigger="manual", workflow="w1") == 1
    assert value(registry, "sluice_runs_created_total", trigger="manual", workflow="w1") is None
    assert value(registry, "sluice_runs_started_total", trigger="manual", workflow="w1") == 1
    assert value(registry, "sluice_runs_succeeded_total", trigger="manual", workflow="w1") == 1
    assert value(registry, "sluice_step_duration_seconds_count", type="http", status="succeeded") == 1
    assert value(registry, "sluice_rate_limited_wakeups_total") == 1
    runs.flush()
    assert value(registry, "sluice_runs_created_total", trigger="manual", workflow="w1") == 1


def test_a_dead_workers_flush_socket_is_removed(tmp_path: Any) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"flush_{gone.pid}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))  # closed without listening: connections are refused
    (tmp_path / "counter_1.db").write_bytes(b"")
    assert multiproc.request_flush(str(tmp_path)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_1.db"]
    stale.write_bytes(b"")
    multiproc.prepare_directory({multiproc.ENV: str(tmp_path)})
    assert list(tmp_path.iterdir()) == []


EXITING_WORKER = """
import sys
import falcon, falcon.testing
from prometheus_client import CollectorRegistry
from sluice_api.metrics import HttpMetrics
from sluice_api.multiproc import Flusher

metrics = HttpMetrics(CollectorRegistry())
flusher = Flusher(sys.argv[1], seconds=3600)  # no periodic flush before the exit
flusher.add(metrics.flush)
flusher.start()
client = falcon.testing.TestClient(falcon.App(middleware=[metrics]))
for _ in range(5):
    client.simulate_get("/anything")
"""


def test_a_worker_that_exits_flushes_what_it_counted(tmp_path: Any) -> None:
    env = {k: v for k, v in os.environ.items() if k.upper() != multiproc.ENV} | {multiproc.ENV: str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", EXITING_WORKER, str(tmp_path)], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    labels = {"method": "GET", "route": "unmatched"}
    assert from_files(str(tmp_path), "sluice_http_requests_total", **labels, status="404") == 5
    assert from_files(str(tmp_path), "sluice_http_request_duration_seconds_count", **labels) == 5
    assert not list(tmp_path.glob("*.sock"))


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
