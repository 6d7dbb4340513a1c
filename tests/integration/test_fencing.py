"""Fencing: an execution whose claim was lost can neither overwrite nor close the run's newer one.

A claim commits without waiting for the WAL flush, so a database crash right after it loses the
claim while its worker has already started the run; the run is then claimed again with the same
worker id and the same attempt number. The test puts the database in exactly the state such a
crash leaves (the claim gone; a claim writes nothing else) and lets both executions run to the end.
"""

from __future__ import annotations

import threading

import httpx

from sluice_common.runs import recover_expired
from sluice_common.runstate import RENEW_LEASES
from sluice_worker.executor import RunExecutor
from tests.httpserver import LocalServer
from tests.integration.conftest import Pipeline


def executor(pipeline: Pipeline, worker_id: str) -> RunExecutor:
    return RunExecutor(
        pipeline.settings,
        pipeline.pool,
        pipeline.broker,
        pipeline.limiter,
        httpx.Client(),
        worker_id,
        threading.Event(),
    )


def forget_the_claim(pipeline: Pipeline, run_id: str) -> None:
    """What a crash does to a claim whose commit never reached the disk."""
    with pipeline.pool.connection() as conn:
        conn.execute(
            "UPDATE runs SET status = 'queued', attempt = attempt - 1, claim_id = NULL, worker_id = NULL, "
            "lease_expires_at = NULL, started_at = NULL, attempt_started_at = NULL WHERE id = %s",
            (run_id,),
        )


def test_a_claim_lost_in_a_crash_cannot_close_or_overwrite_the_new_execution(
    pipeline: Pipeline, http_server: LocalServer
) -> None:
    owner = pipeline.user()
    steps = [
        {"id": "first", "type": "http", "config": {"url": f"{http_server.base}/ok?key=fence-first"}},
        {"id": "second", "type": "transform", "config": {"value": "{{ steps.first.body.hit }}"}},
    ]
    wf = pipeline.workflow(owner, steps)
    run = pipeline.enqueue(wf, owner)
    # The same worker id on both sides: the crash gives the run back to the very same worker.
    stale, fresh = executor(pipeline, "w1"), executor(pipeline, "w1")
    old = stale.claim()
    assert old is not None
    forget_the_claim(pipeline, old.run_id)
    new = fresh.claim()
    assert new is not None
    assert (new.run_id, new.attempt) == (old.run_id, old.attempt)
    assert new.claim_id != old.claim_id

    # The stale execution runs first: its first checkpoint is refused, and it stops there.
    stale.finish(old, stale.run(old))
    row = pipeline.run(run.run_id)
    assert (row["status"], str(row["claim_id"])) == ("running", new.claim_id)
    assert pipeline.steps(run.run_id) == []

    fresh.finish(new, fresh.run(new))
    row = pipeline.run(run.run_id)
    assert (row["status"], row["attempt"], row["claim_id"]) == ("succeeded", 1, None)
    recorded = {s["step_id"]: s for s in pipeline.steps(run.run_id)}
    # The result is the new execution's: its own call to the target (the second hit).
    assert recorded["second"]["output"] == 2
    attempts = pipeline.attempts(run.run_id)
    assert [(a["attempt"], a["lost"], a["status"]) for a in attempts] == [(1, False, "succeeded"), (1, True, "failed")]
    assert str(attempts[1]["claim_id"]) == old.claim_id
    assert "lost its claim" in attempts[1]["error"]


def test_a_late_finish_after_recovery_is_refused_and_not_recorded_twice(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, [{"id": "a", "type": "transform", "config": {"value": 1}}])
    run = pipeline.enqueue(wf, owner)
    frozen = executor(pipeline, "frozen")
    claimed = frozen.claim()
    assert claimed is not None
    outcome = frozen.run(claimed)  # done, but the worker stalls before it records the end
    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE runs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (run.run_id,))
    assert recover_expired(pipeline.pool, pipeline.broker, pipeline.settings.lease_seconds) == [run.run_id]
    again = executor(pipeline, "frozen").claim()  # another claim takes the run: attempt 2
    assert again is not None
    assert again.attempt == 2
    with pipeline.pool.connection() as conn:
        renew = {"lease": 15, "ids": [claimed.run_id]}
        assert conn.execute(RENEW_LEASES, {**renew, "claims": [claimed.claim_id]}).rowcount == 0
        assert conn.execute(RENEW_LEASES, {**renew, "claims": [again.claim_id]}).rowcount == 1
    frozen.finish(claimed, outcome)
    row = pipeline.run(run.run_id)
    assert (row["status"], str(row["claim_id"])) == ("running", again.claim_id)
    # Recovery already closed the lost attempt: no second record of it.
    assert [(a["attempt"], a["lost"], a["status"]) for a in pipeline.attempts(run.run_id)] == [
        (1, False, "failed"),
        (2, False, "running"),
    ]


def test_a_stale_execution_ending_leaves_the_new_claims_lease_renewed(pipeline: Pipeline) -> None:
    """Both executions of the run in one process (its claim was lost in a crash and the same worker
    claimed it again): when the stale one ends, the process goes on renewing the new claim's lease."""
    owner = pipeline.user()
    wf = pipeline.workflow(owner, [{"id": "a", "type": "transform", "config": {"value": 1}}])
    run = pipeline.enqueue(wf, owner)
    worker = executor(pipeline, "w1")
    old = worker.claim()
    assert old is not None
    worker._track(old, add=True)  # as _claim_and_run does around each execution
    forget_the_claim(pipeline, old.run_id)
    new = worker.claim()
    assert new is not None
    worker._track(new, add=True)
    worker._track(old, add=False)  # the stale execution ends first
    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE runs SET lease_expires_at = now() + interval '0.1 second' WHERE id = %s", (run.run_id,))
    assert worker.renew_leases() == 1
    row = pipeline.run(run.run_id)
    assert str(row["claim_id"]) == new.claim_id
    with pipeline.pool.connection() as conn:
        left = conn.execute("SELECT lease_expires_at - now() AS left FROM runs WHERE id = %s", (run.run_id,)).fetchone()
    assert left is not None
    assert left["left"].total_seconds() > pipeline.settings.lease_seconds / 2  # renewed: a whole lease again
    worker._track(new, add=False)
    assert worker.renew_leases() == 0
