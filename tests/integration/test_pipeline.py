"""The run pipeline against real PostgreSQL and Redis, with real Dramatiq workers."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import httpx
import psycopg
import pytest
import redis

from sluice_api.resources.queue import queue_stats_body
from sluice_common.broker import send_run_message
from sluice_common.errors import NotFoundError
from sluice_common.ratelimit import RedisRateLimiter
from sluice_common.runs import (
    cancel_run,
    change_rate_limit,
    get_queue_stats,
    reconcile,
    recover_expired,
)
from sluice_common.runstate import CLAIM, SHARED_CLAIM_RUNS
from sluice_worker.executor import RunExecutor
from tests.httpserver import LocalServer
from tests.integration.conftest import Pipeline

NOOP = [{"id": "a", "type": "transform", "config": {"value": {"ok": True}}}]
TERMINAL = {"succeeded", "failed", "cancelled"}


def test_a_run_goes_from_queued_to_succeeded_with_its_steps(pipeline: Pipeline, http_server: LocalServer) -> None:
    owner = pipeline.user()
    steps = [
        {"id": "fetch", "type": "http", "config": {"url": f"{http_server.base}/ok?key=one"}},
        {"id": "shape", "type": "transform", "config": {"value": [1, 2, 3]}},
    ]
    wf = pipeline.workflow(owner, steps)
    run = pipeline.enqueue(wf, owner, trigger_data={"x": 1})
    assert pipeline.run(run.run_id)["status"] == "queued"
    pipeline.start_worker()
    [row] = pipeline.wait_for([run.run_id], TERMINAL)
    assert row["status"] == "succeeded"
    assert row["attempt"] == 1
    assert row["started_at"] >= row["queued_at"]
    assert row["finished_at"] >= row["started_at"]
    recorded = pipeline.steps(run.run_id)
    assert [s["step_id"] for s in recorded] == ["fetch", "shape"]
    assert recorded[0]["output"]["status"] == 200
    assert recorded[0]["output"]["body"]["key"] == "one"
    assert recorded[1]["output"] == [1, 2, 3]
    assert [a["status"] for a in pipeline.attempts(run.run_id)] == ["succeeded"]


def test_priority_is_strict_across_the_queue(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    low = [pipeline.enqueue(wf, owner, priority=10).run_id for _ in range(100)]
    urgent = pipeline.enqueue(wf, owner, priority=1).run_id
    pipeline.start_worker(threads=1, user_concurrency=1000)
    rows = pipeline.wait_for([*low, urgent], TERMINAL, timeout=60)
    assert all(r["status"] == "succeeded" for r in rows)
    order = sorted(rows, key=lambda r: r["started_at"])
    assert order[0]["id"] == urgent
    # The priority-10 runs kept their own first-in first-out order.
    assert [r["id"] for r in order[1:]] == low


def test_a_backlog_is_worked_through_without_a_message_per_run(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    runs = [pipeline.enqueue(wf, owner, priority=1 + i % 3).run_id for i in range(40)]
    app = pipeline.start_worker(threads=2, user_concurrency=1000)
    rows = pipeline.wait_for(runs, TERMINAL, timeout=30)
    assert all(r["status"] == "succeeded" and r["attempt"] == 1 for r in rows)
    # Threads went on from run to run, each taking a waiting wake-up off the queue for it...
    assert app.executor.chained > 0
    assert app.executor.wakeups + app.executor.chained >= len(runs)
    # ...so the queue empties without leaving a wake-up behind, and each run started in order.
    queue = f"{pipeline.broker.namespace}:runs"
    deadline = time.monotonic() + 10
    while pipeline.redis.hlen(f"{queue}.msgs") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pipeline.redis.hlen(f"{queue}.msgs") == 0
    assert pipeline.redis.llen(queue) == 0
    by_start = sorted(rows, key=lambda r: r["started_at"])
    priorities = [r["priority"] for r in by_start]
    # Two threads: a run may start just before a better one claimed a moment later by the other.
    assert sum(1 for a, b in itertools.pairwise(priorities) if a > b) <= 2


def test_a_delayed_run_waits_and_shows_as_delayed(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    pipeline.start_worker()
    run = pipeline.enqueue(wf, owner, delay_ms=1500)
    row = pipeline.run(run.run_id)
    assert row["status"] == "delayed"
    stats = get_queue_stats(pipeline.pool, pipeline.settings, pipeline.limiter, redis=True)
    assert (stats.delayed, stats.waiting) == (1, 0)
    time.sleep(0.8)
    assert pipeline.run(run.run_id)["status"] == "delayed"
    [done] = pipeline.wait_for([run.run_id], TERMINAL, timeout=15)
    assert done["status"] == "succeeded"
    assert (done["started_at"] - row["queued_at"]).total_seconds() >= 1.5


def test_retry_then_success(pipeline: Pipeline, http_server: LocalServer) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(
        owner, [{"id": "f", "type": "http", "config": {"url": f"{http_server.base}/flaky?key=r&fail=2"}}]
    )
    run = pipeline.enqueue(wf, owner)
    pipeline.start_worker()
    [row] = pipeline.wait_for([run.run_id], TERMINAL)
    assert row["status"] == "succeeded"
    assert row["attempt"] == 3
    attempts = pipeline.attempts(run.run_id)
    assert [a["status"] for a in attempts] == ["failed", "failed", "succeeded"]
    assert "answered 500" in attempts[0]["error"]
    # Backoff separated the attempts (at least the configured minimum of 50 ms).
    assert (attempts[1]["started_at"] - attempts[0]["finished_at"]).total_seconds() >= 0.05
    assert http_server.hits["r"] == 3


def test_final_failure_after_max_attempts(pipeline: Pipeline, http_server: LocalServer) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, [{"id": "f", "type": "http", "config": {"url": f"{http_server.base}/fail?key=ff"}}])
    run = pipeline.enqueue(wf, owner)
    pipeline.start_worker()
    [row] = pipeline.wait_for([run.run_id], TERMINAL)
    assert row["status"] == "failed"
    assert row["attempt"] == 3
    assert "answered 500" in row["error"]
    assert len(pipeline.attempts(run.run_id)) == 3
    assert http_server.hits["ff"] == 3


def test_per_workflow_attempts_override(pipeline: Pipeline, http_server: LocalServer) -> None:
    owner = pipeline.user()
    steps = [{"id": "f", "type": "http", "config": {"url": f"{http_server.base}/fail?key=once"}}]
    wf = pipeline.workflow(owner, steps, maxAttempts=1)
    run = pipeline.enqueue(wf, owner)
    pipeline.start_worker()
    [row] = pipeline.wait_for([run.run_id], TERMINAL)
    assert (row["status"], row["attempt"]) == ("failed", 1)


def test_a_fail_step_is_final(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, [{"id": "guard", "type": "fail", "config": {"message": "no input"}}])
    run = pipeline.enqueue(wf, owner)
    pipeline.start_worker()
    [row] = pipeline.wait_for([run.run_id], TERMINAL)
    assert (row["status"], row["attempt"]) == ("failed", 1)
    assert "no input" in row["error"]


def test_rate_limit_holds_runs_without_failing_or_spinning(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    pipeline.limiter.set_limit(3)
    app = pipeline.start_worker(threads=2, user_concurrency=100)
    runs = [pipeline.enqueue(wf, owner).run_id for _ in range(6)]
    time.sleep(3)
    rows = [pipeline.run(r) for r in runs]
    assert sorted(r["status"] for r in rows) == ["queued"] * 3 + ["succeeded"] * 3
    held = [r for r in rows if r["status"] == "queued"]
    assert all(r["attempt"] == 0 and r["error"] is None for r in held)
    # Held-back wake-ups sleep until the window frees a slot: a handful of messages, not a loop.
    assert app.executor.wakeups < 20
    # Raising the limit at run time releases them at once, without a restart.
    assert change_rate_limit(pipeline.pool, pipeline.broker, pipeline.limiter, 100) == 3
    rows = pipeline.wait_for(runs, TERMINAL, timeout=10)
    assert all(r["status"] == "succeeded" for r in rows)


def test_one_users_burst_does_not_starve_another(pipeline: Pipeline, http_server: LocalServer) -> None:
    hog, other = pipeline.user(), pipeline.user()
    slow = pipeline.workflow(hog, [{"id": "s", "type": "http", "config": {"url": f"{http_server.base}/slow?s=0.2"}}])
    quick = pipeline.workflow(other, NOOP)
    burst = [pipeline.enqueue(slow, hog).run_id for _ in range(40)]
    mine = pipeline.enqueue(quick, other).run_id
    pipeline.start_worker(threads=2, user_concurrency=1)
    [row] = pipeline.wait_for([mine], TERMINAL, timeout=10)
    assert row["status"] == "succeeded"
    waiting = [r for r in (pipeline.run(b) for b in burst) if r["status"] == "queued"]
    assert len(waiting) >= 30  # the other user's run did not wait behind the burst
    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE runs SET status = 'cancelled' WHERE status = 'queued'")


def test_redelivered_messages_never_run_a_finished_run_again(pipeline: Pipeline, http_server: LocalServer) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, [{"id": "h", "type": "http", "config": {"url": f"{http_server.base}/ok?key=once"}}])
    run = pipeline.enqueue(wf, owner)
    app = pipeline.start_worker(threads=2)
    pipeline.wait_for([run.run_id], TERMINAL)
    for _ in range(5):
        send_run_message(pipeline.broker, str(run.run_id))
    # A thread that has just finished the run may take one of them straight off the queue (chained).
    deadline = time.monotonic() + 10
    while app.executor.wakeups + app.executor.chained < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.executor.wakeups + app.executor.chained >= 6
    row = pipeline.run(run.run_id)
    assert (row["status"], row["attempt"]) == ("succeeded", 1)
    assert http_server.hits["once"] == 1
    assert len(pipeline.attempts(run.run_id)) == 1


def test_idempotency_key_returns_the_same_run(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    first = pipeline.enqueue(wf, owner, idempotency_key="order-42")
    again = pipeline.enqueue(wf, owner, idempotency_key="order-42")
    other = pipeline.enqueue(wf, owner, idempotency_key="order-43")
    assert first.created
    assert not again.created
    assert again.run_id == first.run_id
    assert other.run_id != first.run_id


def test_a_webhook_run_is_refused_once_its_secret_changed(pipeline: Pipeline) -> None:
    """The API serves a webhook from the workflow it remembers for the secret: the insert itself
    must refuse a secret that was rotated since, with or without an idempotency key."""
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE workflows SET webhook_secret_hash = %s WHERE id = %s", (b"old", wf))
    assert pipeline.enqueue(wf, owner, trigger_type="webhook", webhook_secret_hash=b"old").created
    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE workflows SET webhook_secret_hash = %s WHERE id = %s", (b"new", wf))
    for key in (None, "k"):
        with pytest.raises(NotFoundError):
            pipeline.enqueue(wf, owner, trigger_type="webhook", webhook_secret_hash=b"old", idempotency_key=key)
    assert pipeline.enqueue(wf, owner, trigger_type="webhook", webhook_secret_hash=b"new").created


def test_reconciler_restores_runs_after_redis_loses_everything(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    due = [pipeline.enqueue(wf, owner).run_id for _ in range(5)]
    later = pipeline.enqueue(wf, owner, delay_ms=3000).run_id
    # What FLUSHDB does to Sluice, limited to this test's keys (the Redis may be shared).
    keys = list(pipeline.redis.scan_iter(match=f"{pipeline.settings.redis_prefix}*"))
    assert keys
    pipeline.redis.delete(*keys)
    pipeline.start_worker(threads=2)
    time.sleep(1.5)
    assert {pipeline.run(r)["status"] for r in due} == {"queued"}  # nothing left to wake them
    assert reconcile(pipeline.pool, pipeline.broker, pipeline.settings) == 5  # one per due run
    rows = pipeline.wait_for(due, TERMINAL, timeout=15)
    assert all(r["status"] == "succeeded" and r["attempt"] == 1 for r in rows)
    # The delayed run lost its wake-up too; once due, the next pass wakes it, and only it.
    assert pipeline.run(later)["status"] == "delayed"
    with pipeline.pool.connection() as conn:
        while not conn.execute("SELECT not_before <= now() AS due FROM runs WHERE id = %s", (later,)).fetchone()["due"]:
            time.sleep(0.1)
    time.sleep(0.5)
    assert pipeline.run(later)["status"] == "delayed"  # due, but nothing woke it
    assert reconcile(pipeline.pool, pipeline.broker, pipeline.settings) == 1
    [row] = pipeline.wait_for([later], TERMINAL, timeout=15)
    assert (row["status"], row["attempt"]) == ("succeeded", 1)
    assert reconcile(pipeline.pool, pipeline.broker, pipeline.settings) == 0


def test_cancel_queued_and_running(pipeline: Pipeline, http_server: LocalServer) -> None:
    owner = pipeline.user()
    quick = pipeline.workflow(owner, NOOP)
    queued = pipeline.enqueue(quick, owner, delay_ms=500)
    assert cancel_run(pipeline.pool, queued.run_id, owner) == "cancelled"
    steps = [
        {"id": "wait", "type": "http", "config": {"url": f"{http_server.base}/slow?s=1&key=c1"}},
        {"id": "after", "type": "http", "config": {"url": f"{http_server.base}/ok?key=c2"}},
    ]
    slow = pipeline.workflow(owner, steps)
    running = pipeline.enqueue(slow, owner)
    pipeline.start_worker()
    pipeline.wait_for([running.run_id], {"running"})
    assert cancel_run(pipeline.pool, running.run_id, owner) == "running"
    [row] = pipeline.wait_for([running.run_id], TERMINAL)
    assert row["status"] == "cancelled"
    assert http_server.hits["c1"] == 1
    assert http_server.hits["c2"] == 0
    time.sleep(0.7)
    assert pipeline.run(queued.run_id)["started_at"] is None


def test_a_cancel_during_a_failing_attempt_is_not_retried(pipeline: Pipeline, http_server: LocalServer) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, [{"id": "s", "type": "http", "config": {"url": f"{http_server.base}/slowfail?s=1"}}])
    run = pipeline.enqueue(wf, owner)
    pipeline.start_worker()
    pipeline.wait_for([run.run_id], {"running"})
    assert cancel_run(pipeline.pool, run.run_id, owner) == "running"
    [row] = pipeline.wait_for([run.run_id], TERMINAL)
    assert (row["status"], row["attempt"]) == ("cancelled", 1)
    time.sleep(0.5)
    assert http_server.hits["/slowfail"] == 1


def test_run_time_limit_is_enforced(pipeline: Pipeline, http_server: LocalServer) -> None:
    owner = pipeline.user()
    steps = [{"id": "s", "type": "http", "config": {"url": f"{http_server.base}/slow?s=5"}}]
    wf = pipeline.workflow(owner, steps, timeoutSeconds=1, maxAttempts=1)
    run = pipeline.enqueue(wf, owner)
    started = time.monotonic()
    pipeline.start_worker()
    [row] = pipeline.wait_for([run.run_id], TERMINAL)
    assert row["status"] == "failed"
    assert "timed out" in row["error"]
    assert time.monotonic() - started < 4


def test_shutdown_hands_back_and_completed_steps_are_not_repeated(pipeline: Pipeline, http_server: LocalServer) -> None:
    owner = pipeline.user()
    # Step one outlasts the 2-second lease: the stopping worker must keep renewing it.
    steps = [
        {"id": "one", "type": "http", "config": {"url": f"{http_server.base}/slow?s=3&key=s1"}},
        {"id": "two", "type": "http", "config": {"url": f"{http_server.base}/ok?key=s2"}},
    ]
    wf = pipeline.workflow(owner, steps)
    run = pipeline.enqueue(wf, owner)
    first = pipeline.start_worker()
    pipeline.wait_for([run.run_id], {"running"})
    second = pipeline.start_worker()  # idle, but its housekeeping would recover a lapsed lease
    first.stop()  # step one finishes, then the run is handed back
    pipeline.workers.remove(first)
    [done] = pipeline.wait_for([run.run_id], TERMINAL)
    assert (done["status"], done["attempt"]) == ("succeeded", 1)
    assert http_server.hits["s1"] == 1
    assert http_server.hits["s2"] == 1
    attempts = pipeline.attempts(run.run_id)
    assert [a["status"] for a in attempts] == ["succeeded"]  # the hand-back cost no attempt
    assert attempts[0]["worker_id"] == second.executor.worker_id


def test_queue_stats_are_exact_and_fit_the_seeds_shape(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    done = [pipeline.enqueue(wf, owner).run_id for _ in range(3)]
    pipeline.start_worker()
    pipeline.wait_for(done, TERMINAL)
    pipeline.workers[0].stop()
    pipeline.workers.clear()
    for priority in (1, 1, 5):
        pipeline.enqueue(wf, owner, priority=priority)
    pipeline.enqueue(wf, owner, delay_ms=60_000)
    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE runs SET status = 'failed', finished_at = now() WHERE id = %s", (done[0],))
    stats = get_queue_stats(pipeline.pool, pipeline.settings, pipeline.limiter, redis=True)
    assert (stats.waiting, stats.active, stats.completed, stats.failed, stats.delayed) == (3, 0, 2, 1, 1)
    assert stats.total == 3
    assert stats.waiting_by_priority == {1: 2, 5: 1}
    body = queue_stats_body(stats, {"initialized": False, "scheduledWorkflows": 0})
    assert body["queue"]["stats"] == {"waiting": 3, "active": 0, "completed": 2, "failed": 1, "delayed": 1, "total": 3}
    assert body["queue"]["redis"] is True
    assert body["capacity"] == {"message": "Running up to 10 workflows concurrently. 0 active, 3 queued."}
    assert body["alerts"] == ["High failure rate detected"]


def test_runs_held_by_the_user_cap_all_complete(pipeline: Pipeline, http_server: LocalServer) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, [{"id": "s", "type": "http", "config": {"url": f"{http_server.base}/slow?s=0.1"}}])
    runs = [pipeline.enqueue(wf, owner).run_id for _ in range(6)]
    pipeline.start_worker(threads=3, user_concurrency=1)
    rows = pipeline.wait_for(runs, TERMINAL, timeout=20)
    assert all(r["status"] == "succeeded" for r in rows)
    spans = sorted((r["started_at"], r["finished_at"]) for r in rows)
    # Never two at once for this user: each started after the previous one finished.
    assert all(nxt[0] >= prev[1] for prev, nxt in itertools.pairwise(spans))


def test_recovery_counts_the_lost_attempt_and_honours_cancel(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    again, exhausted, cancelled = (pipeline.enqueue(wf, owner).run_id for _ in range(3))
    with pipeline.pool.connection() as conn:
        # Three runs whose worker vanished: leases lapsed a second ago.
        conn.execute(
            "UPDATE runs SET status = 'running', attempt = 1, worker_id = 'gone', "
            "lease_expires_at = now() - interval '1 second' WHERE owner_id = %s",
            (owner,),
        )
        conn.execute("UPDATE runs SET attempt = max_attempts WHERE id = %s", (exhausted,))
        conn.execute("UPDATE runs SET cancel_requested = true WHERE id = %s", (cancelled,))
    recovered = recover_expired(pipeline.pool, pipeline.broker, pipeline.settings.lease_seconds)
    assert sorted(map(str, recovered)) == sorted(map(str, (again, exhausted, cancelled)))
    assert pipeline.run(again)["status"] == "queued"
    assert pipeline.run(exhausted)["status"] == "failed"
    assert "worker lost during attempt 3" in pipeline.run(exhausted)["error"]
    assert pipeline.run(cancelled)["status"] == "cancelled"
    assert recover_expired(pipeline.pool, pipeline.broker, pipeline.settings.lease_seconds) == []
    pipeline.start_worker()
    [row] = pipeline.wait_for([again], TERMINAL)
    assert (row["status"], row["attempt"]) == ("succeeded", 2)


def max_connections(pipeline: Pipeline) -> int:
    with pipeline.pool.connection() as conn:
        row = conn.execute("SELECT current_setting('max_connections')::int AS m").fetchone()
    assert row is not None
    return int(row["m"])


def queued_runs(pipeline: Pipeline, owner: str, count: int) -> list[str]:
    """``count`` queued runs of one workflow of ``owner``: one enqueued, the others copies of its row."""
    first = pipeline.enqueue(pipeline.workflow(owner, NOOP), owner).run_id
    with pipeline.pool.connection() as conn:
        rows = conn.execute(
            "INSERT INTO runs SELECT (jsonb_populate_record(NULL::runs, to_jsonb(r) || "
            "jsonb_build_object('id', gen_random_uuid()))).* FROM runs r, generate_series(2, %s) WHERE r.id = %s "
            "RETURNING id",
            (count, first),
        ).fetchall()
    return [str(first), *(str(row["id"]) for row in rows)]


def test_the_user_cap_is_exact_where_claims_share_the_owners_lock(pipeline: Pipeline) -> None:
    # Far below the cap claims take the owner's lock in shared mode and run side by side; near it
    # they take it exclusively. Eight threads claiming at once (in batches, through the worker's
    # group commit) across that boundary must stop at exactly the cap.
    cap = max_connections(pipeline) * SHARED_CLAIM_RUNS + 6  # shared mode up to 6 runs below the cap
    owner = pipeline.user()
    runs = queued_runs(pipeline, owner, cap + 20)
    settings = pipeline.settings.model_copy(update={"user_concurrency": cap})
    executor = RunExecutor(
        settings, pipeline.pool, pipeline.broker, pipeline.limiter, httpx.Client(), "cap-test", threading.Event()
    )
    claimed: list[str] = []
    lock = threading.Lock()

    def claim_all() -> None:
        while (run := executor.claim()) is not None:
            with lock:
                claimed.append(run.run_id)

    threads = [threading.Thread(target=claim_all) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(claimed) == len(set(claimed)) == cap
    rows = [pipeline.run(r) for r in runs]
    assert sum(r["status"] == "running" for r in rows) == cap


def test_a_claim_sharing_the_owners_lock_takes_a_bounded_share_of_the_owners_runs(pipeline: Pipeline) -> None:
    cap = max_connections(pipeline) * SHARED_CLAIM_RUNS + 100
    owner = pipeline.user()
    queued_runs(pipeline, owner, SHARED_CLAIM_RUNS + 10)
    params = {"worker": "w", "lease": 30.0, "user_cap": cap, "exclusive": False, "count": SHARED_CLAIM_RUNS + 5}
    with pipeline.pool.connection() as conn:
        assert len(conn.execute(CLAIM, params).fetchall()) == SHARED_CLAIM_RUNS
        # Claimed with the exclusive lock, the same batch is not limited.
        assert len(conn.execute(CLAIM, {**params, "exclusive": True}).fetchall()) == 10


def test_batch_claims_open_at_once_do_not_pass_the_cap_together(pipeline: Pipeline) -> None:
    # A claim counts the committed running runs and its own batch, not the batches of claims still
    # open beside it. Two workers' batches, each far below the cap, must not pass it together:
    # where the cap leaves less room than every open claim's largest batch, the second claim waits
    # for the first and counts its runs.
    cap = 3 * max_connections(pipeline)
    owner = pipeline.user()
    queued_runs(pipeline, owner, cap + 20)
    params = {"worker": "w", "lease": 30.0, "user_cap": cap, "exclusive": False, "count": cap // 2 + 10}
    second: list[int] = []

    def claim_beside(conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            second.append(len(conn.execute(CLAIM, params).fetchall()))

    with pipeline.pool.connection() as first, pipeline.pool.connection() as other:
        with first.transaction():
            assert len(first.execute(CLAIM, params).fetchall()) == cap // 2 + 10
            thread = threading.Thread(target=claim_beside, args=(other,))
            thread.start()
            thread.join(1)  # waits for the first claim's lock, or (the fault) claims beside it
        thread.join(30)
    assert not thread.is_alive()
    assert second == [cap - (cap // 2 + 10)]
    with pipeline.pool.connection() as conn:
        row = conn.execute(
            "SELECT count(*) AS n FROM runs WHERE owner_id = %s AND status = 'running'", (owner,)
        ).fetchone()
    assert row is not None
    assert row["n"] == cap


def test_the_claim_is_costed_as_one_run_and_never_compiled(pipeline: Pipeline) -> None:
    # sluice_claim_run returns one row at most (migration 0009): costed as PostgreSQL's default of
    # 1,000, the claim statement crossed jit_above_cost and was JIT-compiled on every execution.
    params = {"worker": "w", "lease": 30.0, "user_cap": 5, "exclusive": False, "count": 1}
    with pipeline.pool.connection() as conn:
        row = conn.execute(f"EXPLAIN (FORMAT JSON) {CLAIM}", params).fetchone()
        assert row is not None
        cost = float(row["QUERY PLAN"][0]["Plan"]["Total Cost"])
        jit = conn.execute("SHOW jit").fetchone()
    assert cost < 1_000, cost
    # And Sluice's connections never JIT-compile whatever the planner estimates.
    assert jit is not None
    assert jit["jit"] == "off"


def test_a_chain_ends_quietly_when_redis_cannot_be_asked_for_more(pipeline: Pipeline) -> None:
    class Unreachable(RedisRateLimiter):
        def acquire_waiting(self) -> bool:
            raise redis.ConnectionError("Redis went away")

    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    runs = [pipeline.enqueue(wf, owner).run_id for _ in range(2)]
    limiter = Unreachable(pipeline.redis, pipeline.settings.redis_prefix, 100_000)
    executor = RunExecutor(
        pipeline.settings, pipeline.pool, pipeline.broker, limiter, httpx.Client(), "chain-test", threading.Event()
    )
    executor.handle(str(runs[0]))  # no exception: the message's own run is done
    assert [pipeline.run(r)["status"] for r in runs] == ["succeeded", "queued"]
    assert executor.chained == 0
