"""The worker's group commits on real PostgreSQL: claims that its threads ask for while one is in
flight are made by one statement (``runstate.CLAIM`` with a count), in dispatch order and within
each owner's cap; attempts that end while another is being recorded are recorded together
(``runstate.FINISH_ENDED_MANY``), each as it would be alone: its run, its last step, its attempt,
the fence and the wake-up of the owner's next run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import pytest

from sluice_common import runstate
from sluice_worker.claims import Claimed
from sluice_worker.engine import Outcome
from sluice_worker.executor import RunExecutor
from tests.integration.conftest import Pipeline

# These tests hold a write and let others arrive behind it, to be batched.
pytestmark = pytest.mark.usefixtures("steady_load")


STEPS = [{"id": "a", "type": "transform", "config": {"value": "{{ trigger.n }}"}}]


def executor(pipeline: Pipeline, **overrides: Any) -> RunExecutor:
    settings = pipeline.settings.model_copy(update=overrides)
    return RunExecutor(
        settings, pipeline.pool, pipeline.broker, pipeline.limiter, httpx.Client(), "w-finish", threading.Event()
    )


def claim_and_run(ex: RunExecutor) -> tuple[Claimed, Outcome]:
    claimed = ex.claim()
    assert claimed is not None
    return claimed, ex.run(claimed)


@contextmanager
def run_row_locked(pipeline: Pipeline, run_id: str) -> Iterator[None]:
    """Hold a run's row, so that the finish of its attempt waits while others end behind it."""
    with pipeline.pool.connection() as conn, conn.transaction():
        conn.execute("SELECT 1 FROM runs WHERE id = %s FOR UPDATE", (run_id,))
        yield


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def finish_behind_a_held_one(
    pipeline: Pipeline, ex: RunExecutor, first: tuple[Claimed, Outcome], rest: list[tuple[Claimed, Outcome]]
) -> tuple[str, list[Future[str]]]:
    """Finish ``first`` while its row is held, let ``rest`` end behind it, then let it go: ``rest``
    are recorded as the next batch. Returns how each execution ended."""
    with ThreadPoolExecutor(len(rest) + 1) as threads:
        with run_row_locked(pipeline, first[0].run_id):
            leader = threads.submit(ex.finish, *first)
            wait_for(lambda: ex._finishes._writes > 0)
            futures = [threads.submit(ex.finish, *r) for r in rest]
            wait_for(lambda: len(ex._finishes._queued) == len(rest))
        return leader.result(timeout=10), futures


def test_attempts_that_end_together_are_recorded_together_each_as_alone(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, STEPS)
    runs = [pipeline.enqueue(wf, owner, trigger_data={"n": n}).run_id for n in range(4)]
    ex = executor(pipeline)
    ran = [claim_and_run(ex) for _ in runs]
    assert [o.status for _, o in ran] == ["succeeded"] * 4
    first, futures = finish_behind_a_held_one(pipeline, ex, ran[0], ran[1:])
    assert first == "succeeded"
    assert [f.result(timeout=10) for f in futures] == ["succeeded"] * 3
    assert (ex._finishes.batches, ex._finishes.batched) == (1, 3)
    for claimed, _ in ran:
        run = pipeline.run(claimed.run_id)
        assert run["status"] == "succeeded"
        assert run["finished_at"] is not None
        assert run["claim_id"] is None
        assert run["worker_id"] is None
        assert run["lease_expires_at"] is None
        (step,) = pipeline.steps(claimed.run_id)
        assert step["status"] == "succeeded"
        assert step["output"] == claimed.trigger_data["n"]
        assert step["attempt"] == claimed.attempt
        assert [(a["status"], a["finished_at"] is not None) for a in pipeline.attempts(claimed.run_id)] == [
            ("succeeded", True)
        ]


def test_failed_and_cancelled_ends_in_a_batch_keep_their_errors(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, STEPS, maxAttempts=1)
    for n in range(3):
        pipeline.enqueue(wf, owner, trigger_data={"n": n})
    ex = executor(pipeline)
    ran = [claim_and_run(ex) for _ in range(3)]
    rest = [
        (ran[1][0], Outcome("failed", "boom", final=True)),
        (ran[2][0], Outcome("cancelled", "cancelled by the user")),
    ]
    _, futures = finish_behind_a_held_one(pipeline, ex, ran[0], rest)
    assert [f.result(timeout=10) for f in futures] == ["failed", "cancelled"]
    assert ex._finishes.batches == 1
    for (claimed, outcome), status in zip(rest, ("failed", "cancelled"), strict=True):
        run = pipeline.run(claimed.run_id)
        assert (run["status"], run["error"]) == (status, outcome.error)
        assert [(a["status"], a["error"]) for a in pipeline.attempts(claimed.run_id)] == [(status, outcome.error)]
        assert pipeline.steps(claimed.run_id) == []  # no final step: nothing written


@pytest.mark.parametrize("holder_in_batch", [False, True])
def test_an_execution_that_lost_its_claim_is_refused_in_a_batch(pipeline: Pipeline, holder_in_batch: bool) -> None:
    """An execution whose claim was taken over ends in a batch, beside another run's end, or beside
    the end of the execution that holds its run now: it changes nothing and is told it is lost."""
    owner = pipeline.user()
    wf = pipeline.workflow(owner, STEPS)
    for n in range(3):
        pipeline.enqueue(wf, owner, trigger_data={"n": n})
    ex = executor(pipeline)
    blocker, other = claim_and_run(ex), claim_and_run(ex)
    stale_claimed, _ = claim_and_run(ex)
    # Its lease lapsed and the run went back to the queue: another execution claims it again.
    with pipeline.pool.connection() as conn:
        conn.execute(
            "UPDATE runs SET status = 'queued', claim_id = NULL, worker_id = NULL WHERE id = %s",
            (stale_claimed.run_id,),
        )
    current = claim_and_run(ex)
    assert current[0].run_id == stale_claimed.run_id
    assert current[0].claim_id != stale_claimed.claim_id
    stale = (stale_claimed, Outcome("failed", "stale execution", final=True))
    rest = [stale, current] if holder_in_batch else [stale, other]
    _, futures = finish_behind_a_held_one(pipeline, ex, blocker, rest)
    assert [f.result(timeout=10) for f in futures] == ["lost", "succeeded"]
    assert ex._finishes.batches == 1
    run = pipeline.run(stale_claimed.run_id)
    if not holder_in_batch:
        assert (run["status"], str(run["claim_id"])) == ("running", current[0].claim_id)
        assert ex.finish(*current) == "succeeded"
        run = pipeline.run(stale_claimed.run_id)
    assert (run["status"], run["error"]) == ("succeeded", None)
    # The stale end closed nothing of the run's: as it would alone, it is recorded as a lost
    # execution of its own (no recovery closed its attempt here, the test put the run back).
    attempts = [
        (a["attempt"], a["lost"], a["status"], str(a["claim_id"])) for a in pipeline.attempts(stale_claimed.run_id)
    ]
    assert attempts == [
        (stale_claimed.attempt, True, "failed", stale_claimed.claim_id),
        (current[0].attempt, False, "succeeded", current[0].claim_id),
    ]


@pytest.mark.parametrize("queued_behind", [True, False])
def test_ends_in_a_batch_wake_the_next_run_of_an_owner_at_the_cap(pipeline: Pipeline, queued_behind: bool) -> None:
    """An owner at the cap whose runs end together: wake-ups for their waiting run, and none
    when nothing of theirs waits (negative control)."""
    capped, other = pipeline.user(), pipeline.user()
    wf, other_wf = pipeline.workflow(capped, STEPS), pipeline.workflow(other, STEPS)
    blocker_run = pipeline.enqueue(other_wf, other, trigger_data={"n": 0}, priority=1).run_id
    for n in range(2):
        pipeline.enqueue(wf, capped, trigger_data={"n": n}, priority=2)
    ex = executor(pipeline, user_concurrency=2)
    ran = [claim_and_run(ex) for _ in range(3)]
    assert ran[0][0].run_id == str(blocker_run)
    if queued_behind:
        pipeline.enqueue(wf, capped, trigger_data={"n": 9}, priority=2)
    finishes = [ex.finish_for(c, o) for c, o in ran[1:]]
    with ThreadPoolExecutor(3) as threads:
        with run_row_locked(pipeline, str(blocker_run)):
            leader = threads.submit(ex._finish_with_retries, ex.finish_for(*ran[0]))
            wait_for(lambda: ex._finishes._writes > 0)
            futures = [threads.submit(ex._finish_with_retries, f) for f in finishes]
            wait_for(lambda: len(ex._finishes._queued) == 2)
        assert leader.result(timeout=10) is not None
        rows = [f.result(timeout=10) for f in futures]
    assert ex._finishes.batches == 1
    assert [(r or {}).get("wake_next") for r in rows] == [queued_behind, queued_behind]


def test_claims_asked_for_together_are_made_together_in_dispatch_order_within_the_cap(pipeline: Pipeline) -> None:
    capped, other = pipeline.user(), pipeline.user()
    wf, other_wf = pipeline.workflow(capped, STEPS), pipeline.workflow(other, STEPS)
    first = [pipeline.enqueue(wf, capped, trigger_data={"n": n}, priority=1).run_id for n in range(3)]
    later = [pipeline.enqueue(other_wf, other, trigger_data={"n": n}, priority=5).run_id for n in range(2)]
    ex = executor(pipeline, user_concurrency=2)
    with ThreadPoolExecutor(5) as threads:
        with pipeline.pool.connection() as conn, conn.transaction():
            # The capped owner's lock: the first claim (of their first run) waits for it.
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s::text, 5))", (capped,))
            leader = threads.submit(ex.claim)
            wait_for(lambda: ex._claims._writes > 0)
            futures = [threads.submit(ex.claim) for _ in range(4)]
            wait_for(lambda: len(ex._claims._queued) == 4)
        claims = [leader.result(timeout=10), *(f.result(timeout=10) for f in futures)]
    assert (ex._claims.batches, ex._claims.batched) == (1, 4)
    got = [c.run_id if c is not None else None for c in claims]
    # The leader's, then the batch's, chosen in dispatch order: the capped owner's second run, then
    # (their third one is over the cap) the other owner's; which of the batch's threads gets which
    # of them does not matter. The fourth thread, left without one, claims alone and finds nothing
    # it may start.
    assert got[0] == str(first[0])
    assert {*got[1:4]} == {str(first[1]), str(later[0]), str(later[1])}
    assert got[4] is None
    assert pipeline.run(first[2])["status"] == "queued"
    # One statement, one transaction: the batch's runs started at the same transaction time.
    started = [pipeline.run(run_id)["started_at"] for run_id in got[1:4]]
    assert len(set(started)) == 1
    assert started[0] > pipeline.run(got[0])["started_at"]
    for claimed in claims[:4]:
        assert claimed is not None
        run = pipeline.run(claimed.run_id)
        assert (run["status"], str(run["claim_id"])) == ("running", claimed.claim_id)
        assert [(a["status"], str(a["claim_id"])) for a in pipeline.attempts(claimed.run_id)] == [
            ("running", claimed.claim_id)
        ]
        assert claimed.steps == STEPS


@pytest.mark.parametrize("user_cap", [100, 1_000_000], ids=["exclusive", "shared"])
def test_a_batch_claim_locks_the_runs_it_takes_and_no_more(pipeline: Pipeline, user_cap: int) -> None:
    """The claim reads its candidates from a cursor a row at a time, each locked as it is read: the
    runs after the last one it took stay free for other workers' claims while its transaction is
    open (a cursor that read ahead would hold them, and those claims would skip them)."""
    owner = pipeline.user()
    wf = pipeline.workflow(owner, STEPS)
    runs = [str(pipeline.enqueue(wf, owner, trigger_data={"n": n}).run_id) for n in range(12)]
    params = {"worker": "w", "lease": 30.0, "user_cap": user_cap, "exclusive": False, "count": 3}
    with pipeline.pool.connection() as c, pipeline.pool.connection() as d, c.transaction(force_rollback=True):
        taken = [str(row["id"]) for row in c.execute(runstate.CLAIM, params).fetchall()]
        assert sorted(taken) == sorted(runs[:3])  # the first three in dispatch order
        free = d.execute(
            "SELECT id::text FROM runs WHERE id = ANY(%s::uuid[]) FOR UPDATE SKIP LOCKED", (runs,)
        ).fetchall()
        assert sorted(row["id"] for row in free) == sorted(runs[3:])


def advisory_waiters(pipeline: Pipeline) -> int:
    with pipeline.pool.connection() as conn:
        row = conn.execute(
            "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
    assert row is not None
    return int(row["n"])


def test_claims_that_meet_two_owners_in_opposite_orders_do_not_deadlock(pipeline: Pipeline) -> None:
    """Claim 1 waits for owner A's lock (held here) with A's first run locked. Claim 2 skips that
    run, takes B's first run and B's lock, then meets A's second run. Waiting for A's lock there, it
    would hold B's, which claim 1 comes to next: a deadlock, which PostgreSQL breaks after a second
    by failing one claim. Holding a lock, a claim only tries for the next."""
    a, b = pipeline.user(), pipeline.user()
    wf_a, wf_b = pipeline.workflow(a, STEPS), pipeline.workflow(b, STEPS)
    runs = []
    for n in range(3):  # dispatch order: A, B, A, B, A, B
        runs.append(str(pipeline.enqueue(wf_a, a, trigger_data={"n": n}).run_id))
        runs.append(str(pipeline.enqueue(wf_b, b, trigger_data={"n": n}).run_id))
    params = {"worker": "w", "lease": 30.0, "user_cap": 5, "exclusive": False, "count": 4}
    outcomes: dict[int, Any] = {}

    def claim(n: int) -> None:
        with pipeline.pool.connection() as conn:
            try:
                outcomes[n] = [str(row["id"]) for row in conn.execute(runstate.CLAIM, params).fetchall()]
            except Exception as exc:
                outcomes[n] = exc

    threads = [threading.Thread(target=claim, args=(n,)) for n in (1, 2)]
    with pipeline.pool.connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s::text, 5))", (a,))
        threads[0].start()
        wait_for(lambda: advisory_waiters(pipeline) == 1)  # claim 1, on A's first run
        threads[1].start()
        # Claim 2 takes B's first run and ends at A's second: it does not wait while holding B.
        threads[1].join(5)
        assert not threads[1].is_alive()
        assert outcomes[2] == [runs[1]]
    threads[0].join(10)
    assert not threads[0].is_alive()
    # Claim 1 goes on once A's lock is free, and finds B's lock free by then too.
    assert sorted(outcomes[1]) == sorted([runs[0], runs[2], runs[3], runs[4]])


def test_a_claim_that_cannot_lock_its_second_owner_and_chose_nothing_says_busy(pipeline: Pipeline) -> None:
    """Its first owner is at the cap, and the next candidate's owner is locked by another claim:
    rather than wait for it (holding the first owner's lock), the claim raises lock_not_available,
    and the worker sends its wake-up again."""
    capped, other = pipeline.user(), pipeline.user()
    wf_capped, wf_other = pipeline.workflow(capped, STEPS), pipeline.workflow(other, STEPS)
    held = str(pipeline.enqueue(wf_capped, capped).run_id)
    waiting = str(pipeline.enqueue(wf_capped, capped).run_id)
    free = str(pipeline.enqueue(wf_other, other).run_id)
    params = {"worker": "w", "lease": 30.0, "user_cap": 1, "exclusive": False, "count": 1}
    with pipeline.pool.connection() as conn:
        assert [str(r["id"]) for r in conn.execute(runstate.CLAIM, params).fetchall()] == [held]
    with pipeline.pool.connection() as other_claim, other_claim.transaction(force_rollback=True):
        other_claim.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s::text, 5))", (other,))
        with pipeline.pool.connection() as conn, conn.transaction(force_rollback=True):
            conn.execute("SET LOCAL statement_timeout = '5s'")  # a claim that waited would hang here
            with pytest.raises(psycopg.errors.LockNotAvailable):
                conn.execute(runstate.CLAIM, params)
    with pipeline.pool.connection() as conn:  # once the other claim is over, the free run is taken
        assert [str(r["id"]) for r in conn.execute(runstate.CLAIM, params).fetchall()] == [free]
    assert pipeline.run(waiting)["status"] == "queued"
