"""An attempt's row is written once, when the attempt ends: while it runs, the run's row is its record
(``runs.attempt_started_at`` with the run's attempt, worker and claim), and the attempts shown
(``runstate.ATTEMPTS``) take the running one from there. Rows of the same number that were there
before (a parked attempt's, a running one a claim of the previous release inserted) are written
over as they should be: by the finishes, one at a time and in batches, and by recovery."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest

from sluice_common.db import migrate
from sluice_common.runs import recover_expired
from sluice_worker.claims import Claimed
from sluice_worker.engine import Outcome
from sluice_worker.executor import RunExecutor
from tests.integration.conftest import Pipeline
from tests.integration.test_claims_and_finishes import claim_and_run, finish_behind_a_held_one
from tests.integration.test_fencing import executor
from tests.integration.test_migrations import empty_database, make_run, migrate_before  # noqa: F401 - a fixture

STEPS = [{"id": "a", "type": "transform", "config": {"value": 1}}]


def claimed_run(pipeline: Pipeline, worker_id: str) -> tuple[RunExecutor, str, Claimed]:
    """A new run of a one-step workflow, claimed by a worker of that id."""
    owner = pipeline.user()
    pipeline.enqueue(pipeline.workflow(owner, STEPS), owner)
    ex = executor(pipeline, worker_id)
    claimed = ex.claim()
    assert claimed is not None
    return ex, claimed.run_id, claimed


def rows(pipeline: Pipeline, run_id: str) -> list[dict[str, Any]]:
    """run_attempts as stored, not as shown."""
    with pipeline.pool.connection() as conn:
        found = conn.execute(
            "SELECT attempt, lost, status, worker_id, claim_id, started_at, finished_at FROM run_attempts "
            "WHERE run_id = %s ORDER BY attempt, lost",
            (run_id,),
        ).fetchall()
    return [dict(r) for r in found]


def shown(pipeline: Pipeline, run_id: str) -> list[tuple[Any, ...]]:
    return [
        (a["attempt"], a["status"], a["worker_id"], str(a["claim_id"]), a["started_at"], a["finished_at"] is not None)
        for a in pipeline.attempts(run_id)
    ]


def previous_release_claim(pipeline: Pipeline, run_id: str, claim_id: str, started: datetime) -> None:
    """The running attempt row a claim of the previous release inserted, started at ``started``,
    made before the new claim function was in (so the run has no ``attempt_started_at``)."""
    with pipeline.pool.connection() as conn:
        conn.execute(
            "INSERT INTO run_attempts (run_id, attempt, status, worker_id, claim_id, started_at) "
            "SELECT id, attempt, 'running', worker_id, claim_id, %s FROM runs WHERE id = %s AND claim_id = %s",
            (started, run_id, claim_id),
        )
        conn.execute("UPDATE runs SET attempt_started_at = NULL WHERE id = %s", (run_id,))


@pytest.mark.parametrize("together", [False, True])
@pytest.mark.usefixtures("steady_load")
def test_a_running_attempt_is_the_runs_row_until_its_end_writes_it(pipeline: Pipeline, together: bool) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, STEPS)
    runs = [pipeline.enqueue(wf, owner).run_id for _ in range(3 if together else 1)]
    ex = executor(pipeline, "w-attempts")
    ran = [claim_and_run(ex) for _ in runs]
    for claimed, _ in ran:
        assert rows(pipeline, claimed.run_id) == []
        started = pipeline.run(claimed.run_id)["attempt_started_at"]
        assert started is not None
        assert shown(pipeline, claimed.run_id) == [(1, "running", "w-attempts", claimed.claim_id, started, False)]
    if together:  # the last two end while the first is being recorded: they are recorded as one batch
        first, futures = finish_behind_a_held_one(pipeline, ex, ran[0], ran[1:])
        assert [first] + [f.result(timeout=10) for f in futures] == ["succeeded"] * 3
        assert (ex._finishes.batches, ex._finishes.batched) == (1, 2)
    else:
        assert ex.finish(*ran[0]) == "succeeded"
    for claimed, _ in ran:
        started = pipeline.run(claimed.run_id)["attempt_started_at"]
        assert shown(pipeline, claimed.run_id) == [(1, "succeeded", "w-attempts", claimed.claim_id, started, True)]
        assert [(r["attempt"], r["lost"], r["status"]) for r in rows(pipeline, claimed.run_id)] == [
            (1, False, "succeeded")
        ]


def test_an_attempt_that_reuses_a_parked_number_writes_its_own_start(pipeline: Pipeline) -> None:
    ex, run_id, parked = claimed_run(pipeline, "w-attempts")
    # The attempt parks the run for a moment: its number is given back, its row stays.
    resume_at = datetime.now().astimezone() + timedelta(milliseconds=50)
    assert ex.finish(parked, Outcome("parked", None, resume_at=resume_at)) == "parked"
    first = rows(pipeline, run_id)
    assert [(r["attempt"], r["status"]) for r in first] == [(1, "parked")]
    threading.Event().wait(0.1)
    again = executor(pipeline, "w-again").claim()
    assert again is not None
    assert again.attempt == 1
    # While it runs, the shown attempt 1 is the running one, not the parked row.
    started = pipeline.run(run_id)["attempt_started_at"]
    assert started > first[0]["started_at"]
    assert shown(pipeline, run_id) == [(1, "running", "w-again", again.claim_id, started, False)]
    assert executor(pipeline, "w-again").finish(again, Outcome("succeeded", None)) == "succeeded"
    assert [(r["status"], r["worker_id"], str(r["claim_id"]), r["started_at"]) for r in rows(pipeline, run_id)] == [
        ("succeeded", "w-again", again.claim_id, started)
    ]


def test_the_previous_releases_running_row_keeps_its_start_when_it_ends(pipeline: Pipeline) -> None:
    ex, run_id, claimed = claimed_run(pipeline, "w-attempts")
    earlier = datetime.now().astimezone() - timedelta(minutes=5)
    previous_release_claim(pipeline, run_id, claimed.claim_id, earlier)
    assert [(a["status"], a["started_at"]) for a in pipeline.attempts(run_id)] == [
        ("running", pipeline.run(run_id)["updated_at"])  # shown once, from the run's row
    ]
    assert ex.finish(claimed, ex.run(claimed)) == "succeeded"
    assert [(r["attempt"], r["status"], r["started_at"]) for r in rows(pipeline, run_id)] == [(1, "succeeded", earlier)]


@pytest.mark.parametrize("previous_release", [False, True])
def test_recovery_writes_the_lost_attempt_with_its_start(pipeline: Pipeline, previous_release: bool) -> None:
    _, run_id, claimed = claimed_run(pipeline, "w-lost")
    started = pipeline.run(run_id)["attempt_started_at"]
    if previous_release:
        started = datetime.now().astimezone() - timedelta(minutes=5)
        previous_release_claim(pipeline, run_id, claimed.claim_id, started)
    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE runs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (run_id,))
    assert [str(r) for r in recover_expired(pipeline.pool, pipeline.broker, 0.0)] == [run_id]
    assert [
        (r["attempt"], r["lost"], r["status"], r["worker_id"], str(r["claim_id"]), r["started_at"])
        for r in rows(pipeline, run_id)
    ] == [(1, False, "failed", "w-lost", claimed.claim_id, started)]
    assert pipeline.run(run_id)["status"] == "queued"


def test_the_migration_gives_running_runs_the_start_of_their_running_attempt(empty_database: str) -> None:  # noqa: F811
    migrate_before(empty_database, "0017")
    started = datetime.now().astimezone() - timedelta(minutes=5)
    with psycopg.connect(empty_database, autocommit=True) as conn:
        make_run(conn, status="running", attempt=2, claim_id=uuid.uuid4(), worker_id="old")
        make_run(conn, status="queued")
        conn.execute(
            "INSERT INTO run_attempts (run_id, attempt, status, worker_id, started_at, finished_at) "
            "SELECT id, 1, 'failed', 'old', %s - interval '1 minute', %s FROM runs WHERE status = 'running'",
            (started, started),
        )
        conn.execute(
            "INSERT INTO run_attempts (run_id, attempt, status, worker_id, claim_id, started_at) "
            "SELECT id, 2, 'running', 'old', claim_id, %s FROM runs WHERE status = 'running'",
            (started,),
        )
    assert "0017_attempt_at_end" in migrate(empty_database)
    with psycopg.connect(empty_database) as conn:
        found = conn.execute("SELECT status, attempt_started_at FROM runs ORDER BY status").fetchall()
    assert found == [("queued", None), ("running", started)]
