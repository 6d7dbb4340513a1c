"""The run state machine has one home: every status a run takes is a listed transition, and no
statement outside ``sluice_common.runstate`` writes ``runs.status``."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sluice_api import queries
from sluice_common import runstate
from sluice_common.runs import cancel_run, recover_expired
from sluice_common.runstate import TRANSITIONS, RunStatus
from sluice_worker.executor import RunExecutor
from tests.httpserver import LocalServer
from tests.integration.conftest import Pipeline

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [*ROOT.glob("libs/*/src/**/*.py"), *ROOT.glob("services/*/src/**/*.py")]

# A statement that writes a run's status: an INSERT into runs, or an UPDATE of runs that sets it.
_WRITES_STATUS = re.compile(
    r"INSERT\s+INTO\s+runs\b|UPDATE\s+runs\b(?:\s+\w+)?\s+SET\b(?:(?!\bWHERE\b).)*?\bstatus\s*=",
    re.IGNORECASE | re.DOTALL,
)


def test_the_transitions_are_the_documented_state_machine() -> None:
    pairs = {(t.source, t.target) for t in TRANSITIONS}
    s = RunStatus
    assert pairs == {
        (None, s.QUEUED),
        (None, s.DELAYED),
        (s.QUEUED, s.RUNNING),
        (s.DELAYED, s.RUNNING),
        (s.RUNNING, s.SUCCEEDED),
        (s.RUNNING, s.FAILED),
        (s.RUNNING, s.CANCELLED),
        (s.RUNNING, s.DELAYED),
        (s.RUNNING, s.QUEUED),
        (s.RUNNING, s.WAITING),
        (s.WAITING, s.QUEUED),
        (s.QUEUED, s.CANCELLED),
        (s.DELAYED, s.CANCELLED),
        (s.WAITING, s.CANCELLED),
        (s.FAILED, s.QUEUED),
    }
    # Nothing leaves an ended state except a person's retry of a failed run.
    assert {t.source for t in TRANSITIONS if t.source in runstate.TERMINAL} == {s.FAILED}
    # Every transition names a statement of the module.
    for t in TRANSITIONS:
        assert isinstance(getattr(runstate, t.by), str), t


def test_no_statement_outside_the_state_machine_writes_a_runs_status() -> None:
    assert len(SOURCES) > 20
    home = ROOT / "libs/common/src/sluice_common/runstate.py"
    assert _WRITES_STATUS.search(home.read_text())  # the pattern finds what it looks for
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES if p != home and _WRITES_STATUS.search(p.read_text())]
    assert offenders == []


def test_the_scan_would_catch_a_status_write() -> None:
    assert _WRITES_STATUS.search("UPDATE runs SET error = NULL, status = 'queued' WHERE id = %s")
    assert _WRITES_STATUS.search("update runs r set\n  status = 'failed'\nwhere r.id = 1")
    assert _WRITES_STATUS.search("INSERT INTO runs (workflow_id) VALUES (1)")
    assert not _WRITES_STATUS.search("UPDATE runs SET lease_expires_at = now() WHERE status = 'running'")


# An UPDATE of runs that sets finished_at.
_SETS_FINISHED_AT = re.compile(
    r"UPDATE\s+runs\b(?:\s+\w+)?\s+SET\b(?:(?!\bWHERE\b).)*?\bfinished_at\s*=", re.IGNORECASE | re.DOTALL
)


def test_every_move_into_or_out_of_a_counted_state_sets_finished_at() -> None:
    """The finished counts' update trigger fires on UPDATE OF finished_at only (migration 0016)."""
    counted = {RunStatus.SUCCEEDED, RunStatus.FAILED}
    moves = [t for t in TRANSITIONS if t.source is not None and (t.source in counted or t.target in counted)]
    assert {t.by for t in moves} == {"FINISH_ENDED", "FINISH_FUNCTION", "RECOVER_EXPIRED", "RETRY"}
    for t in moves:
        assert _SETS_FINISHED_AT.search(getattr(runstate, t.by)), t
    assert not _SETS_FINISHED_AT.search("UPDATE runs SET status = 'failed' WHERE finished_at IS NULL")


@pytest.fixture
def observed(pipeline: Pipeline) -> Iterator[set[tuple[str | None, str]]]:
    """Every (old status, new status) a run takes while the test runs, recorded by a trigger."""
    with pipeline.pool.connection() as conn:
        conn.execute("CREATE TABLE seen_transitions (source text, target text)")
        conn.execute(
            """
            CREATE FUNCTION record_transition() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF TG_OP = 'INSERT' THEN
                    INSERT INTO seen_transitions VALUES (NULL, NEW.status);
                ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
                    INSERT INTO seen_transitions VALUES (OLD.status, NEW.status);
                END IF;
                RETURN NULL;
            END $$
            """
        )
        conn.execute(
            "CREATE TRIGGER record_transition AFTER INSERT OR UPDATE ON runs "
            "FOR EACH ROW EXECUTE FUNCTION record_transition()"
        )
    seen: set[tuple[str | None, str]] = set()
    yield seen
    with pipeline.pool.connection() as conn:
        conn.execute("DROP TRIGGER record_transition ON runs")


def test_runs_only_take_listed_transitions(
    pipeline: Pipeline, http_server: LocalServer, observed: set[tuple[str | None, str]]
) -> None:
    owner = pipeline.user()
    ok = pipeline.workflow(owner, [{"id": "a", "type": "transform", "config": {"value": 1}}])
    flaky = pipeline.workflow(
        owner, [{"id": "f", "type": "http", "config": {"url": f"{http_server.base}/flaky?fail=1&key=rs"}}]
    )
    failing = pipeline.workflow(owner, [{"id": "x", "type": "fail", "config": {"message": "no"}}])
    parked = pipeline.workflow(
        owner,
        [
            {"id": "w", "type": "delay", "config": {"seconds": 0.3}},
            {"id": "a", "type": "transform", "config": {"value": 3}},
        ],
    )
    # The child waits a moment first: its parent has parked (running -> waiting) before it ends,
    # however the two threads are scheduled (a child that ends first leaves its parent queued).
    child = pipeline.workflow(
        owner,
        [
            {"id": "w", "type": "delay", "config": {"seconds": 0.3}},
            {"id": "c", "type": "transform", "config": {"value": 2}},
        ],
    )
    parent = pipeline.workflow(owner, [{"id": "p", "type": "workflow", "config": {"workflowId": child}}])

    done = [pipeline.enqueue(wf, owner).run_id for wf in (ok, flaky, failing, parked, parent)]
    done.append(pipeline.enqueue(ok, owner, delay_ms=200).run_id)
    cancelled = pipeline.enqueue(ok, owner, delay_ms=60_000).run_id
    assert cancel_run(pipeline.pool, cancelled, owner) == "cancelled"
    worker = pipeline.start_worker(threads=2)
    rows = pipeline.wait_for(done, {"succeeded", "failed"})
    assert [r["status"] for r in rows] == ["succeeded", "succeeded", "failed", "succeeded", "succeeded", "succeeded"]

    # A person retries the failed run; a run whose worker vanished is recovered.
    queries.retry_run(pipeline.pool, pipeline.broker, pipeline.settings, owner, done[2])  # type: ignore[arg-type]
    pipeline.wait_for([done[2]], {"failed"})
    # No worker of its own from here on: its threads and sweeps would race the stray claim.
    worker.stop(timeout_ms=5000)
    pipeline.workers.remove(worker)
    lost = pipeline.enqueue(ok, owner, delay_ms=60_000).run_id
    stray = RunExecutor(
        pipeline.settings, pipeline.pool, pipeline.broker, pipeline.limiter, httpx.Client(), "stray", threading.Event()
    )
    with pipeline.pool.connection() as conn:
        conn.execute(
            "UPDATE runs SET not_before = now(), dispatch_at = now() - interval '1 day' WHERE id = %s", (lost,)
        )
    claimed = stray.claim()
    assert claimed is not None
    assert claimed.run_id == str(lost)
    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE runs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (lost,))
    assert recover_expired(pipeline.pool, pipeline.broker, pipeline.settings.lease_seconds) == [lost]
    pipeline.start_worker()
    pipeline.wait_for([lost], {"succeeded"})
    # Deleting the workflow cancels what it still has queued.
    waiting = pipeline.enqueue(ok, owner, delay_ms=60_000).run_id
    queries.delete_workflow(pipeline.pool, owner, ok)  # type: ignore[arg-type]
    assert pipeline.run(waiting)["status"] == "cancelled"

    with pipeline.pool.connection() as conn:
        observed.update((r["source"], r["target"]) for r in conn.execute("SELECT * FROM seen_transitions").fetchall())
    allowed = {(t.source and str(t.source), str(t.target)) for t in TRANSITIONS}
    assert observed <= allowed, observed - allowed
    # The scenario went through most of the machine (not just created and finished runs).
    assert len(observed) >= 11, observed
    assert {("running", "waiting"), ("waiting", "queued")} <= observed, observed  # the parent parked and woke
