"""A claim that finds nothing only because other transactions hold every runnable run keeps its wake-up.

A claim locks its candidate before it knows whether the owner is at the cap, and holds that lock
until its transaction ends. A wake-up claimed meanwhile skips the locked run; had it been dropped
as "nothing to claim", the run stayed queued with no wake-up once the first claim found the owner
at the cap (until the reconciler's next pass). The claim says "busy" instead
(``lock_not_available``), and the worker sends the wake-up again a moment later.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import pytest

from sluice_common import runstate
from sluice_common.broker import ready_queue_key, send_run_message
from sluice_common.db import DictConnection
from sluice_common.ratelimit import RedisRateLimiter
from sluice_worker.executor import RunExecutor
from tests.integration.conftest import Pipeline

NOOP = [{"id": "a", "type": "transform", "config": {"value": 1}}]


def claim(conn: DictConnection, user_cap: int = 5) -> list[dict[str, Any]]:
    params = {"worker": "w", "lease": 30.0, "user_cap": user_cap, "exclusive": False, "count": 1}
    return conn.execute(runstate.CLAIM, params).fetchall()


@contextmanager
def locked(pipeline: Pipeline, run_id: object) -> Iterator[None]:
    """Holds the run's row lock (as a claim's candidate is held) until the block ends, then rolls back."""
    with pipeline.pool.connection() as conn, conn.transaction(force_rollback=True):
        conn.execute("SELECT 1 FROM runs WHERE id = %s FOR UPDATE", (str(run_id),))
        yield


def test_a_claim_that_skipped_a_run_another_claim_holds_says_busy(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    first = pipeline.enqueue(wf, owner).run_id
    with pipeline.pool.connection() as conn:
        [running] = claim(conn, user_cap=1)
    assert running["id"] == first
    waiting = pipeline.enqueue(wf, owner).run_id
    with pipeline.pool.connection() as c, pipeline.pool.connection() as d:
        with c.transaction(force_rollback=True):
            # Claim C finds the owner at its cap of one: nothing, but its candidate stays locked.
            assert claim(c, user_cap=1) == []
            # The first run ends, and its finish wakes the next run (FINISH_ENDED's wake_next).
            d.execute("UPDATE runs SET status = 'succeeded', claim_id = NULL WHERE id = %s", (str(first),))
            # The claim of that wake-up skips the run C holds: busy, not "nothing to claim".
            with pytest.raises(psycopg.errors.LockNotAvailable):
                claim(d, user_cap=1)
            assert pipeline.run(waiting)["status"] == "queued"
            assert pipeline.attempts(waiting) == []
        # C is over: the wake-up sent again takes the run.
        [row] = claim(d, user_cap=1)
    assert (row["id"], row["attempt"]) == (waiting, 1)
    assert pipeline.run(waiting)["status"] == "running"


def test_a_claim_says_busy_only_while_a_run_it_could_take_is_locked(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    with pipeline.pool.connection() as conn:
        # Nothing runnable at all.
        assert claim(conn) == []
        run = pipeline.enqueue(wf, owner).run_id
        with locked(pipeline, run), pytest.raises(psycopg.errors.LockNotAvailable):
            claim(conn)
        [row] = claim(conn)
        assert row["id"] == run
        # Locked runs a claim could not take anyway: not due yet, or cancel requested.
        later = pipeline.enqueue(wf, owner, delay_ms=60_000).run_id
        cancelling = pipeline.enqueue(wf, owner).run_id
        conn.execute("UPDATE runs SET cancel_requested = true WHERE id = %s", (str(cancelling),))
        with locked(pipeline, later), locked(pipeline, cancelling):
            assert claim(conn) == []
        conn.execute("UPDATE runs SET status = 'cancelled' WHERE id = %s", (str(cancelling),))
        # Only runs of an owner at its cap: nothing, and no busy either (the end of one of the
        # owner's runs sends the next wake-up).
        queued = pipeline.enqueue(wf, owner).run_id
        assert claim(conn, user_cap=1) == []
        assert pipeline.run(queued)["status"] == "queued"
        # Another owner's run, locked, behind the capped owner's: busy.
        other = pipeline.user()
        theirs = pipeline.enqueue(pipeline.workflow(other, NOOP), other).run_id
        with locked(pipeline, theirs), pytest.raises(psycopg.errors.LockNotAvailable):
            claim(conn, user_cap=1)
        [row] = claim(conn, user_cap=1)
        assert row["id"] == theirs


class Queues:
    """The broker's run queue and delay queue as Redis holds them (Dramatiq's layout)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.redis = pipeline.redis
        ready = ready_queue_key(pipeline.broker)
        assert ready is not None
        self.ready = ready
        self.delayed = f"{ready}.DQ"  # Dramatiq's delay queue of the run queue

    def clear(self) -> None:
        self.redis.delete(self.ready, f"{self.ready}.msgs", self.delayed, f"{self.delayed}.msgs")

    def count(self) -> tuple[int, int]:
        """(ready, delayed) wake-ups."""
        return int(self.redis.hlen(f"{self.ready}.msgs")), int(self.redis.hlen(f"{self.delayed}.msgs"))

    def delayed_wakeups(self) -> list[dict[str, Any]]:
        return [json.loads(body) for body in self.redis.hvals(f"{self.delayed}.msgs")]


def executor(pipeline: Pipeline, limiter: RedisRateLimiter | None = None) -> RunExecutor:
    return RunExecutor(
        pipeline.settings,
        pipeline.pool,
        pipeline.broker,
        limiter or pipeline.limiter,
        httpx.Client(),
        "busy-test",
        threading.Event(),
    )


def test_a_wake_up_that_found_every_run_locked_is_sent_again_until_its_run_is_claimed(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    run = str(pipeline.enqueue(wf, owner).run_id)
    queues = Queues(pipeline)
    queues.clear()  # from here on, the only wake-up is the one the worker keeps
    with locked(pipeline, run):
        handler = executor(pipeline)
        handler.handle(run)
        assert queues.count() == (0, 1)
        [kept] = queues.delayed_wakeups()
        assert kept["args"] == [run]
        assert kept["options"]["eta"] <= time.time() * 1000 + 1000
        assert handler.kept == 1
        assert pipeline.limiter.used() == 0  # the start slot was given back
        assert pipeline.run(run)["status"] == "queued"
        # A worker keeps sending it again while the lock is held...
        app = pipeline.start_worker()
        deadline = time.monotonic() + 10
        while app.executor.kept < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.executor.kept >= 2
        assert pipeline.run(run)["status"] == "queued"
    # ...and once it is released, the kept wake-up alone starts the run.
    [row] = pipeline.wait_for([run], {"succeeded", "failed"}, timeout=10)
    assert (row["status"], row["attempt"]) == ("succeeded", 1)
    # Nothing left to send again: the wake-ups stop.
    deadline = time.monotonic() + 5
    while queues.count() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queues.count() == (0, 0)
    kept_after = app.executor.kept
    time.sleep(0.3)
    assert app.executor.kept == kept_after
    assert queues.count() == (0, 0)


def test_a_wake_up_taken_off_the_queue_after_a_run_is_kept_when_every_run_is_locked(pipeline: Pipeline) -> None:
    owner, other = pipeline.user(), pipeline.user()
    first = str(pipeline.enqueue(pipeline.workflow(owner, NOOP), owner).run_id)
    second = str(pipeline.enqueue(pipeline.workflow(other, NOOP), other).run_id)
    queues = Queues(pipeline)
    queues.clear()
    limiter = RedisRateLimiter(
        pipeline.redis,
        pipeline.settings.redis_prefix,
        pipeline.settings.rate_limit_per_minute,
        ready_queue=queues.ready,
    )
    handler = executor(pipeline, limiter)
    with locked(pipeline, second):
        # One wake-up waits in the queue: after the first run, the thread takes it for the next.
        send_run_message(pipeline.broker, second)
        handler.handle(first)
        assert pipeline.run(first)["status"] == "succeeded"
        assert handler.chained == 1
        # The wake-up it took found the other run locked: sent again, not dropped.
        assert queues.count() == (0, 1)
        assert handler.kept == 1
        assert limiter.used() == 1  # the first run's start; the second's slot was given back
        assert pipeline.run(second)["status"] == "queued"
    pipeline.start_worker()
    [row] = pipeline.wait_for([second], {"succeeded", "failed"}, timeout=10)
    assert row["status"] == "succeeded"
