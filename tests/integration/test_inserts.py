"""The API's group commit of new runs (``runs.group_inserts``) on real PostgreSQL: requests that
arrive while an insert is in flight go in together, each gets its own run, and a request the
batch cannot take gets what it would have got alone."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from sluice_common.broker import ready_queue_key
from sluice_common.db import open_pool
from sluice_common.errors import ConflictError, NotFoundError
from sluice_common.groupcommit import GroupCommit
from sluice_common.runs import EnqueuedRun, NewRun, enqueue_run, group_inserts
from tests.integration.conftest import Pipeline
from tests.pgrelay import CuttingRelay

# These tests hold a write and let others arrive behind it, to be batched.
pytestmark = pytest.mark.usefixtures("steady_load")


NOOP = [{"id": "a", "type": "transform", "config": {"value": 1}}]


@contextmanager
def workflow_locked(pipeline: Pipeline, workflow_id: str) -> Iterator[None]:
    """Hold the workflow's row so that an insert of its run waits (its foreign-key check needs a
    share lock on it), while more requests arrive behind that insert."""
    with pipeline.pool.connection() as conn, conn.transaction():
        conn.execute("SELECT 1 FROM workflows WHERE id = %s FOR UPDATE", (workflow_id,))
        yield


def submit_behind_a_held_insert(
    pipeline: Pipeline,
    inserts: GroupCommit[NewRun, EnqueuedRun],
    blocker: str,
    owner: str,
    calls: list[Callable[[], EnqueuedRun]],
) -> tuple[EnqueuedRun, list[Future[EnqueuedRun]]]:
    """Start an insert of a run of ``blocker`` that waits on the workflow's lock, queue ``calls``
    behind it, then let it go: ``calls`` go in as the next batch."""
    with ThreadPoolExecutor(len(calls) + 1) as threads:
        with workflow_locked(pipeline, blocker):
            first = threads.submit(enqueue, pipeline, inserts, blocker, owner)
            wait_for(lambda: inserts._writes > 0)
            futures = [threads.submit(call) for call in calls]
            wait_for(lambda: len(inserts._queued) == len(calls))
        return first.result(timeout=10), futures


def enqueue(
    pipeline: Pipeline, inserts: GroupCommit[NewRun, EnqueuedRun], workflow_id: str, owner: str, **options: Any
) -> EnqueuedRun:
    return enqueue_run(
        pipeline.pool, pipeline.broker, pipeline.settings, NewRun(workflow_id, owner, **options), inserts=inserts
    )


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def stored(pipeline: Pipeline, run_id: Any) -> dict[str, Any]:
    with pipeline.pool.connection() as conn:
        row = conn.execute(
            "SELECT workflow_id, status, trigger_data, priority, not_before IS NOT NULL AS delayed, traceparent"
            " FROM runs WHERE id = %s",
            (run_id,),
        ).fetchone()
    assert row is not None
    return dict(row)


def test_requests_behind_an_insert_go_in_together_and_each_gets_its_own_run(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    blocker, wf = pipeline.workflow(owner, NOOP), pipeline.workflow(owner, NOOP)
    inserts = group_inserts(pipeline.pool, pipeline.settings)
    sent = wake_ups(pipeline)
    calls = [
        (
            lambda n=n: enqueue(
                pipeline,
                inserts,
                wf,
                owner,
                trigger_data={"n": n},
                priority=1 + n,
                delay_ms=n * 1000,
                traceparent=traceparent(n),
            )
        )
        for n in range(5)
    ]
    first, futures = submit_behind_a_held_insert(pipeline, inserts, blocker, owner, calls)
    assert first.created
    assert stored(pipeline, first.run_id)["workflow_id"] == uuid.UUID(blocker)
    assert (inserts.batches, inserts.batched) == (1, 5)
    runs = [f.result(timeout=10) for f in futures]
    assert len({r.run_id for r in runs}) == 5
    for n, run in enumerate(runs):
        row = stored(pipeline, run.run_id)
        assert run.created
        assert run.status == row["status"] == ("queued" if n == 0 else "delayed")
        assert (row["trigger_data"], row["priority"], row["delayed"]) == ({"n": n}, 1 + n, n > 0)
        assert row["workflow_id"] == uuid.UUID(wf)
        assert row["traceparent"] == run.traceparent == traceparent(n)  # tracing is off: the caller's
    # Each got its wake-up, as alone.
    assert wake_ups(pipeline) - sent == 6


def traceparent(n: int) -> str:
    return f"00-{n + 1:032x}-{n + 1:016x}-01"


def wake_ups(pipeline: Pipeline) -> int:
    queue = ready_queue_key(pipeline.broker)
    return int(pipeline.redis.llen(queue)) + int(pipeline.redis.llen(f"{queue}.DQ"))  # type: ignore[arg-type]


def test_a_request_the_batch_cannot_take_gets_what_it_would_get_alone(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    blocker, wf, paused = (pipeline.workflow(owner, NOOP) for _ in range(3))
    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE workflows SET status = 'paused' WHERE id = %s", (paused,))
        conn.execute("UPDATE workflows SET webhook_secret_hash = %s WHERE id = %s", (b"new", wf))
    inserts = group_inserts(pipeline.pool, pipeline.settings)
    earlier = enqueue(pipeline, inserts, wf, owner, idempotency_key="taken")
    calls: list[Callable[[], EnqueuedRun]] = [
        lambda: enqueue(pipeline, inserts, wf, owner, trigger_data={"ok": 1}),
        lambda: enqueue(pipeline, inserts, paused, owner),
        lambda: enqueue(pipeline, inserts, wf, owner, trigger_type="webhook", webhook_secret_hash=b"old"),
        lambda: enqueue(pipeline, inserts, wf, owner, idempotency_key="taken"),
        lambda: enqueue(pipeline, inserts, wf, owner, idempotency_key="twice"),
        lambda: enqueue(pipeline, inserts, wf, owner, idempotency_key="twice"),
        lambda: enqueue(pipeline, inserts, wf, owner, trigger_type="webhook", webhook_secret_hash=b"new"),
    ]
    _, futures = submit_behind_a_held_insert(pipeline, inserts, blocker, owner, calls)
    assert inserts.batches == 1
    ok, on_paused, old_secret, taken, twice_a, twice_b, new_secret = futures
    assert ok.result().created
    assert stored(pipeline, ok.result().run_id)["trigger_data"] == {"ok": 1}
    with pytest.raises(ConflictError):
        on_paused.result()
    with pytest.raises(NotFoundError):
        old_secret.result()
    assert not taken.result().created
    assert taken.result().run_id == earlier.run_id
    pair = sorted([twice_a.result(), twice_b.result()], key=lambda r: r.created)
    assert [r.created for r in pair] == [False, True]
    assert pair[0].run_id == pair[1].run_id
    assert new_secret.result().created
    with pipeline.pool.connection() as conn:
        counts = conn.execute(
            "SELECT count(*) FILTER (WHERE workflow_id = %s) AS wf, count(*) FILTER (WHERE workflow_id = %s) AS paused"
            " FROM runs",
            (wf, paused),
        ).fetchone()
    assert counts is not None
    assert (counts["wf"], counts["paused"]) == (4, 0)


def test_one_request_that_fails_the_batch_statement_fails_alone(pipeline: Pipeline) -> None:
    """A statement error (here a parent run that does not exist) fails the whole batch: the others
    are inserted again alone and succeed; only the bad request gets the error."""
    owner = pipeline.user()
    blocker, wf = pipeline.workflow(owner, NOOP), pipeline.workflow(owner, NOOP)
    inserts = group_inserts(pipeline.pool, pipeline.settings)
    calls: list[Callable[[], EnqueuedRun]] = [
        lambda: enqueue(pipeline, inserts, wf, owner, trigger_data={"n": 1}),
        lambda: enqueue(pipeline, inserts, wf, owner, parent_run_id=uuid.uuid4(), trigger_type="workflow"),
        lambda: enqueue(pipeline, inserts, wf, owner, trigger_data={"n": 2}),
    ]
    _, futures = submit_behind_a_held_insert(pipeline, inserts, blocker, owner, calls)
    assert inserts.batches == 0  # the batch's statement failed
    good = [futures[0].result(), futures[2].result()]
    assert all(r.created for r in good)
    assert [stored(pipeline, r.run_id)["trigger_data"] for r in good] == [{"n": 1}, {"n": 2}]
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        futures[1].result()


def test_a_batch_that_committed_unheard_is_not_inserted_again(pipeline: Pipeline) -> None:
    """The connection breaks after PostgreSQL committed the batch and before its answer came back.
    Its requests must not insert their runs again alone (each request would make two runs): each
    gets the error, as a lone request does in the same case, and the reconciler wakes the runs."""
    owner = pipeline.user()
    blocker, wf = pipeline.workflow(owner, NOOP), pipeline.workflow(owner, NOOP)
    relay = CuttingRelay(pipeline.settings.database_url or "")
    relayed = open_pool(pipeline.settings, relay.url, name="relayed", max_size=10)
    try:
        inserts = group_inserts(relayed, pipeline.settings)
        calls = [
            lambda n=n: enqueue_run(
                relayed, pipeline.broker, pipeline.settings, NewRun(wf, owner, trigger_data={"n": n}), inserts=inserts
            )
            for n in range(3)
        ]
        with ThreadPoolExecutor(4) as threads:
            with workflow_locked(pipeline, blocker):
                first = threads.submit(
                    enqueue_run, relayed, pipeline.broker, pipeline.settings, NewRun(blocker, owner), inserts=inserts
                )
                wait_for(lambda: inserts._writes > 0)
                futures = [threads.submit(call) for call in calls]
                wait_for(lambda: len(inserts._queued) == len(calls))
                relay.cut_after(b"unnest(")  # the batch's statement: INSERT_RUN_MANY
            assert first.result(timeout=10).created
            errors = [f.exception(timeout=10) for f in futures]
        assert relay.cuts == 1
        assert all(isinstance(e, psycopg.OperationalError) for e in errors), errors
        with pipeline.pool.connection() as conn:
            rows = conn.execute("SELECT trigger_data FROM runs WHERE workflow_id = %s", (wf,)).fetchall()
        assert sorted(r["trigger_data"]["n"] for r in rows) == [0, 1, 2]  # each once
        assert inserts._writes == 0
        assert not inserts._queued
    finally:
        relayed.close()
        relay.close()


def test_a_lone_request_inserts_at_once_and_leaves_no_leader_behind(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    inserts = group_inserts(pipeline.pool, pipeline.settings)
    assert enqueue(pipeline, inserts, wf, owner).created
    with pytest.raises(NotFoundError):
        enqueue(pipeline, inserts, str(uuid.uuid4()), owner)
    assert inserts._writes == 0
    assert not inserts._queued
    assert inserts.batches == 0
    # Many at once from many threads: all in, none lost, whatever the batches were.
    with ThreadPoolExecutor(8) as threads:
        runs = list(threads.map(lambda n: enqueue(pipeline, inserts, wf, owner, trigger_data={"n": n}), range(200)))
    assert len({r.run_id for r in runs}) == 200
    with pipeline.pool.connection() as conn:
        row = conn.execute("SELECT count(*) AS n FROM runs WHERE workflow_id = %s", (wf,)).fetchone()
    assert row is not None
    assert row["n"] == 201
    assert inserts._writes == 0
    assert not inserts._queued
    assert threading.active_count() < 50
