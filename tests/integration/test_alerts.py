"""The alert webhook against real PostgreSQL and a real HTTP receiver: each rule's query on real runs,
one post per change across evaluators and a leader handover, retries until delivered."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from sluice_common.runs import cancel_run, get_queue_stats
from sluice_scheduler import alerts
from sluice_scheduler.alerting import AlertJob, AlertStore
from sluice_scheduler.alerts import RULES, AlertRule
from sluice_scheduler.leadership import RedisLease
from sluice_scheduler.maintenance import Job
from sluice_scheduler.scheduler import CronScheduler
from sluice_scheduler.signals import RedisSignals
from sluice_worker.executor import RunExecutor
from tests.conftest import wait_until
from tests.httpserver import running
from tests.integration.conftest import Pipeline

pytestmark = pytest.mark.integration

NOOP = [{"id": "a", "type": "transform", "config": {"value": 1}}]
FAIL = [{"id": "guard", "type": "fail", "config": {"message": "no"}}]
BACKLOG = next(r for r in RULES if r.name == "SluiceQueueBacklog")


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.calls += 1
            failing = self.server.calls <= self.server.fail
            if not failing:
                self.server.received.append(body)
        self.send_response(503 if failing else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()


class Receiver(ThreadingHTTPServer):
    """A webhook receiver: keeps each JSON body it accepted; answers 503 to the first ``fail`` posts."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.fail = 0
        self.calls = 0
        self.received: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/alerts"

    def statuses(self) -> list[tuple[str, str]]:
        with self.lock:
            return [(a["labels"]["alertname"], a["status"]) for b in self.received for a in b["alerts"]]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running(Receiver()) as server:
        yield server


def evaluator(pipeline: Pipeline, receiver: Receiver, *rules: AlertRule, **options: Any) -> AlertJob:
    return AlertJob(AlertStore(pipeline.pool), receiver.url, rules=rules, **options)


def backlog(pipeline: Pipeline, n: int = 51) -> tuple[str, list[str]]:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    return owner, [str(pipeline.enqueue(wf, owner).run_id) for _ in range(n)]


def notices(pipeline: Pipeline) -> list[dict[str, Any]]:
    with pipeline.pool.connection() as conn:
        return [dict(r) for r in conn.execute("SELECT * FROM alert_notices ORDER BY id").fetchall()]


def measure(pipeline: Pipeline) -> dict[str, float | None]:
    with pipeline.pool.connection() as conn:
        return {r.name: r.measure(conn) for r in RULES}


def test_a_backlog_fires_once_and_resolves_once_whichever_evaluator_runs(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    rule = replace(BACKLOG, for_seconds=0.5)
    first = evaluator(pipeline, receiver, rule)
    owner, run_ids = backlog(pipeline)
    first()
    assert receiver.statuses() == []  # pending for its (shortened) for
    time.sleep(0.6)
    first()
    assert receiver.statuses() == [("SluiceQueueBacklog", "firing")]
    [body] = receiver.received
    assert (body["version"], body["status"]) == ("4", "firing")
    [alert] = body["alerts"]
    assert alert["labels"] == {"alertname": "SluiceQueueBacklog", "severity": "warning", "service": "sluice"}
    assert alert["annotations"]["summary"] == "51 runs are waiting for a worker"
    assert alert["value"] == 51
    assert alert["endsAt"] == "0001-01-01T00:00:00Z"

    # Another leader (after a failover) reads the same states: nothing to post again.
    second = evaluator(pipeline, receiver, rule)
    second()
    first()
    assert len(receiver.received) == 1

    for run_id in run_ids:
        cancel_run(pipeline.pool, run_id, owner)
    second()
    first()
    second()
    assert receiver.statuses() == [("SluiceQueueBacklog", "firing"), ("SluiceQueueBacklog", "resolved")]
    resolved = receiver.received[1]["alerts"][0]
    assert resolved["startsAt"] == alert["startsAt"]
    assert resolved["endsAt"] > resolved["startsAt"]
    assert resolved["value"] == 0
    assert [(n["status"], n["attempts"], n["delivered_at"] is not None) for n in notices(pipeline)] == [
        ("firing", 1, True),
        ("resolved", 1, True),
    ]


def test_a_failing_receiver_is_retried_until_it_takes_the_notice_once(pipeline: Pipeline, receiver: Receiver) -> None:
    receiver.fail = 2
    job = evaluator(pipeline, receiver, replace(BACKLOG, for_seconds=0), backoff=(0.5, 1.0))
    backlog(pipeline)
    job()
    [notice] = notices(pipeline)
    assert (notice["attempts"], notice["delivered_at"], notice["last_error"]) == (1, None, "HTTP 503")
    job()  # within the backoff: not posted again yet
    assert receiver.calls == 1
    wait_until(lambda: job() or receiver.received, timeout=10, interval=0.1)
    assert receiver.calls == 3
    assert receiver.statuses() == [("SluiceQueueBacklog", "firing")]
    [notice] = notices(pipeline)
    assert notice["attempts"] == 3
    assert notice["delivered_at"] is not None
    assert notice["last_error"] is None
    for _ in range(3):
        time.sleep(0.25)
        job()
    assert receiver.calls == 3


def test_each_rules_query_on_real_runs(pipeline: Pipeline) -> None:
    assert measure(pipeline) == {
        "SluiceQueueBacklog": 0,
        "SluiceHighFailureRate": None,
        "SluiceNoWorkersWhileRunsWait": 0,
        "SluiceRunsStuckPastLease": 0,
    }
    owner = pipeline.user()
    ok, bad = pipeline.workflow(owner, NOOP), pipeline.workflow(owner, FAIL)
    waiting = [pipeline.enqueue(ok, owner).run_id for _ in range(8)] + [pipeline.enqueue(bad, owner).run_id]
    pipeline.enqueue(ok, owner, delay_ms=600_000)  # not due: not waiting
    values = measure(pipeline)
    # The same number as the stats endpoint (and the queue gauge the Prometheus rule reads).
    stats = get_queue_stats(pipeline.pool, pipeline.settings, pipeline.limiter, redis=True)
    assert values["SluiceQueueBacklog"] == stats.waiting == 9
    assert values["SluiceNoWorkersWhileRunsWait"] == 9  # no worker has held or ended a run

    worker = RunExecutor(
        pipeline.settings,
        pipeline.pool,
        pipeline.broker,
        pipeline.limiter,
        httpx.Client(),
        "alerts-test",
        threading.Event(),
    )
    for run_id in waiting:
        worker.handle(str(run_id))
    assert measure(pipeline)["SluiceHighFailureRate"] is None  # 9 ended runs: too few for a rate
    worker.handle(str(pipeline.enqueue(bad, owner).run_id))
    assert measure(pipeline)["SluiceHighFailureRate"] == pytest.approx(2 / 10)

    # A run that a worker holds is a sign of life; once its lease lapses, it is stuck.
    pipeline.enqueue(ok, owner)
    pipeline.enqueue(ok, owner)
    claimed = worker.claim()
    assert claimed is not None
    values = measure(pipeline)
    assert (values["SluiceNoWorkersWhileRunsWait"], values["SluiceRunsStuckPastLease"]) == (0, 0)
    with pipeline.pool.connection() as conn:
        conn.execute(
            "UPDATE runs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (str(claimed.run_id),)
        )
        # And the runs that ended are older than the activity window.
        conn.execute(
            "UPDATE runs SET finished_at = now() - make_interval(secs => %s) WHERE finished_at IS NOT NULL",
            (alerts.WORKER_ACTIVITY_SECONDS + 1,),
        )
    values = measure(pipeline)
    assert values["SluiceRunsStuckPastLease"] == 1
    assert values["SluiceNoWorkersWhileRunsWait"] == 1  # one run waits, and no worker shows a sign of life


def test_the_leader_posts_from_its_maintenance_and_a_new_leader_does_not_post_again(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    rule = replace(BACKLOG, for_seconds=0)
    prefix = pipeline.settings.redis_prefix

    def replica() -> tuple[CronScheduler, threading.Event]:
        lease = RedisLease(pipeline.redis, prefix, 2.0)
        job = Job("alerts", 0.2, evaluator(pipeline, receiver, rule))
        scheduler = CronScheduler(
            pipeline.settings,
            pipeline.pool,
            pipeline.new_broker(),
            lease,
            RedisSignals(pipeline.redis, prefix),
            jobs=[job],
        )
        stopping = threading.Event()
        scheduler.start(stopping)
        return scheduler, stopping

    replicas = [replica()]
    first, first_stop = replicas[0]
    assert wait_until(first.lease.is_leader)
    replicas.append(replica())
    second = replicas[1][0]
    try:
        owner, run_ids = backlog(pipeline)
        wait_until(receiver.statuses, timeout=10)
        time.sleep(0.6)  # a few more turns of the leader's job
        assert receiver.statuses() == [("SluiceQueueBacklog", "firing")]
        assert not second.lease.is_leader()

        first_stop.set()
        first.join()  # a clean stop hands the lease over at once
        assert wait_until(second.lease.is_leader, timeout=5)
        time.sleep(0.6)  # the new leader's job has run: the alert still fires, posted already
        assert receiver.statuses() == [("SluiceQueueBacklog", "firing")]
        for run_id in run_ids:
            cancel_run(pipeline.pool, run_id, owner)
        wait_until(lambda: len(receiver.statuses()) == 2, timeout=10)
        time.sleep(0.6)
        assert receiver.statuses() == [("SluiceQueueBacklog", "firing"), ("SluiceQueueBacklog", "resolved")]
    finally:
        for scheduler, stopping in replicas:
            if not stopping.is_set():
                stopping.set()
                scheduler.join()
