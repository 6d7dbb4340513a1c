"""The statements of the API, the worker and the scheduler stay index-bound on a runs table of
realistic size: none reads a large table whole.

A database of the module's own gets a 30-day history (``tests.scaledata``), then each statement
runs there the way its service runs it, with ``auto_explain`` handing every plan back to the test,
nested ones included: the claim function's queries, the triggers', and the foreign keys' actions
of a delete. The statements of the run state machine are walked from
:mod:`sluice_common.runstate` itself (a new one fails the test until it has parameters here); the
others through the functions that run them. A plan with a sequential scan of a large table fails.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from dramatiq.brokers.stub import StubBroker
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from sluice_api import queries
from sluice_common import runstate
from sluice_common.broker import RUN_QUEUE
from sluice_common.cron import schedule_preview
from sluice_common.db import DictConnection, Pool
from sluice_common.metrics import expired_leases
from sluice_common.ratelimit import LocalRateLimiter
from sluice_common.runs import (
    FINISHED_COUNTS,
    FINISHED_WINDOWS,
    NewRun,
    change_rate_limit,
    fold_finish_events,
    get_queue_stats,
    insert_run,
    new_run_id,
    queue_history,
    reconcile,
    recover_expired,
)
from sluice_common.settings import Settings, load_settings
from sluice_scheduler import alerts, firing
from sluice_scheduler.maintenance import fold_finished, prune_history
from sluice_worker.executor import RunExecutor
from sluice_worker.subruns import CHILD_STATE_SQL, DEPTH_SQL
from tests.scaledata import Fleet, add_history, make_fleet
from tests.tools import unavailable

HISTORY = 200_000
LARGE = frozenset({"runs", "run_attempts", "run_steps", "cron_fires"})
"""Tables that grow with the history: a plan may not read one of them whole."""
READ_LIMIT = HISTORY // 100
"""The most rows of a large table one scan may read: a page of a list, a batch of the retention
job and the unfinished runs are far fewer, a workflow's or a day's history far more."""


@dataclass
class Plans:
    """Every plan the connections of a :func:`planned_pool` executed, as JSON."""

    seen: list[dict[str, Any]] = field(default_factory=list)

    def notice(self, diag: psycopg.errors.Diagnostic) -> None:
        text = diag.message_primary or ""
        if "plan:" in text:
            self.seen.append(json.loads(text.split("plan:", 1)[1]))

    def take(self) -> list[dict[str, Any]]:
        taken, self.seen = self.seen, []
        return taken


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _rows_read(node: dict[str, Any]) -> float:
    passed = node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
    return (passed + node.get("Rows Removed by Index Recheck", 0)) * node.get("Actual Loops", 1)


def full_scans(plans: list[dict[str, Any]]) -> list[str]:
    """``table: query`` for each read of a large table in the plans that is a sequential scan or
    reads more than :data:`READ_LIMIT` rows (an index that does not bound it)."""
    found = []
    for p in plans:
        for node in _nodes(p["Plan"]):
            table = node.get("Relation Name")
            if table in LARGE and (node["Node Type"] == "Seq Scan" or _rows_read(node) > READ_LIMIT):
                what = f"{node['Node Type']} reading {_rows_read(node):.0f} rows"
                found.append(f"{table}: {what}: {' '.join(p['Query Text'].split())[:300]}")
    return found


def need_auto_explain(url: str) -> None:
    """The plan tests read every plan, a function's statements' too, from ``auto_explain``: a
    contrib module of PostgreSQL, which the embedded server is built without."""
    with psycopg.connect(url) as conn:
        try:
            conn.execute("LOAD 'auto_explain'")
        except psycopg.errors.UndefinedFile:
            unavailable(
                "this PostgreSQL has no auto_explain (the embedded server is built without contrib modules; "
                "SLUICE_TEST_DATABASE_URL can name one that has them, as Debian's postgresql does)"
            )


def explain_everything(conn: psycopg.Connection[Any], plans: Plans) -> None:
    conn.execute("LOAD 'auto_explain'")
    conn.execute("SET auto_explain.log_min_duration = 0")
    conn.execute("SET auto_explain.log_nested_statements = on")
    conn.execute("SET auto_explain.log_format = json")
    # With the rows each node read (and without timing, which costs a clock read per row).
    conn.execute("SET auto_explain.log_analyze = on")
    conn.execute("SET auto_explain.log_timing = off")
    conn.execute("SET client_min_messages = log")
    conn.add_notice_handler(plans.notice)


@dataclass(frozen=True)
class Big:
    url: str
    fleet: Fleet
    settings: Settings
    pool: Pool
    plans: Plans


@pytest.fixture(scope="module")
def big(module_database: str) -> Iterator[Big]:
    need_auto_explain(module_database)
    with psycopg.connect(module_database) as conn:
        fleet = make_fleet(conn)
        add_history(conn, fleet, HISTORY)
    settings = load_settings(
        {"DATABASE_URL": module_database, "SLUICE_LOG_LEVEL": "WARNING", "SLUICE_USER_CONCURRENCY": "1000"}
    )
    plans = Plans()

    def configure(conn: DictConnection) -> None:
        conn.execute("SET jit = off")
        explain_everything(conn, plans)

    pool: Pool = ConnectionPool(
        module_database,
        connection_class=DictConnection,
        kwargs={"row_factory": dict_row, "autocommit": True},
        configure=configure,
        min_size=1,
        max_size=2,
        open=True,
    )
    # A backlog of the kinds of unfinished runs: ready, delayed, running (a lapsed lease among
    # them), and a parent parked on its sub-workflow run.
    wf, owner = fleet.workflows[2]
    with pool.connection() as conn:
        for i in range(200):
            delay = 60_000 * (i % 2)
            insert_run(conn, settings, NewRun(wf, owner, delay_ms=delay))
    limiter = LocalRateLimiter(10**6)
    executor = RunExecutor(settings, pool, StubBroker(), limiter, httpx.Client(), "w", threading.Event())
    for _ in range(20):
        assert executor.claim() is not None
    with pool.connection() as conn:
        conn.execute(
            "UPDATE runs SET lease_expires_at = now() - interval '1 hour' WHERE id = "
            "(SELECT id FROM runs WHERE status = 'running' LIMIT 1)"
        )
    plans.take()
    try:
        yield Big(module_database, fleet, settings, pool, plans)
    finally:
        pool.close()


def test_the_history_is_big_enough_to_matter(big: Big) -> None:
    with big.pool.connection() as conn:
        row = conn.execute("SELECT count(*) AS n FROM runs").fetchone()
    assert row is not None
    assert row["n"] >= HISTORY


def test_the_check_catches_a_full_scan(big: Big) -> None:
    """Negative control: a filter no index serves, an index read of a day's history, and the
    retention's delete without the index on cron_fires.run_id (each deleted run's ON DELETE SET
    NULL then reads cron_fires whole)."""
    with big.pool.connection() as conn:
        conn.execute("SELECT count(*) FROM runs WHERE error = 'nothing'").fetchone()
        assert {s.split(":")[0] for s in full_scans(big.plans.take())} == {"runs"}
        # An index that does not bound the read: the runs of a day, read off runs_finished_idx.
        conn.execute("SELECT count(*) FROM runs WHERE status = 'succeeded' AND finished_at > now() - interval '1 day'")
        found = full_scans(big.plans.take())
        assert [s.split(":")[0] for s in found] == ["runs"]
        assert "Seq Scan" not in found[0]
        with conn.transaction(force_rollback=True):
            fired = conn.execute("SELECT run_id FROM cron_fires WHERE run_id IS NOT NULL LIMIT 10").fetchall()
            conn.execute("DROP INDEX cron_fires_run_idx")
            big.plans.take()
            conn.execute("DELETE FROM runs WHERE id = ANY(%s)", ([r["run_id"] for r in fired],))
            assert any(s.startswith("cron_fires:") for s in full_scans(big.plans.take()))
    big.plans.take()


def _run_of(conn: DictConnection, status: str) -> dict[str, Any]:
    row = conn.execute(
        "SELECT id, claim_id, owner_id, workflow_id, attempt, parent_run_id FROM runs WHERE status = %s LIMIT 1",
        (status,),
    ).fetchone()
    assert row is not None, status
    return row


def runstate_statements() -> dict[str, str]:
    """Every statement of :mod:`sluice_common.runstate` that reads or moves runs, by name (the
    function definitions are planned when a statement here calls them)."""
    return {
        name: value
        for name, value in vars(runstate).items()
        if name.isupper()
        and isinstance(value, str)
        and value.lstrip().split(None, 1)[0].upper() in ("WITH", "SELECT", "INSERT", "UPDATE", "DELETE")
    }


def runstate_params(conn: DictConnection, settings: Settings) -> dict[str, dict[str, Any]]:
    """Representative parameters of each statement of the state machine."""
    running = _run_of(conn, "running")
    failed = _run_of(conn, "failed")
    queued = _run_of(conn, "queued")
    now = datetime.now(UTC)
    finish = {
        "id": running["id"],
        "claim": running["claim_id"],
        "attempt": running["attempt"],
        "worker": "w",
        "error": None,
        "give_back": 0,
        "owner": running["owner_id"],
        "user_cap": settings.user_concurrency,
        "wait": 0,
        "aging_step": settings.priority_aging_seconds,
        "step": "a",
        "pos": 0,
        "output": Jsonb(1),
        "started": now,
        "child": None,
        "status": "succeeded",
        "attempt_status": "succeeded",
    }
    wf, owner = queued["workflow_id"], queued["owner_id"]
    return {
        "INSERT_RUN": {
            "id": new_run_id(),
            "wf": wf,
            "owner": owner,
            "parent": None,
            "trigger": "manual",
            "data": Jsonb({}),
            "priority": 5,
            "delay": 0,
            "max_attempts": 3,
            "aging_step": settings.priority_aging_seconds,
            "key": f"manual:{uuid.uuid4()}",
            "traceparent": None,
            "hook": None,
        },
        "INSERT_RUN_MANY": {
            "ids": [uuid.uuid4(), uuid.uuid4()],
            "wf": [wf, wf],
            "owner": [owner, owner],
            "hook": [None, None],
            "parent": [None, None],
            "trigger": ["manual", "manual"],
            "data": [Jsonb({}), Jsonb({})],
            "priority": [5, 1],
            "delay": [0, 1000],
            "key": [f"manual:{uuid.uuid4()}", None],
            "traceparent": [None, None],
            "max_attempts": 3,
            "aging_step": settings.priority_aging_seconds,
        },
        "CLAIM": {"worker": "w", "lease": 30.0, "user_cap": settings.user_concurrency, "exclusive": False, "count": 2},
        "ATTEMPTS": {"run": running["id"]},
        "CLAIM_CHECKPOINTS": {"run": running["id"]},
        "CHECKPOINT": {
            "step": "a",
            "pos": 0,
            "status": "succeeded",
            "attempt": running["attempt"],
            "output": Jsonb(1),
            "error": None,
            "started": now,
            "run": running["id"],
            "claim": running["claim_id"],
        },
        "RENEW_LEASES": {"lease": 30.0, "ids": [running["id"]], "claims": [running["claim_id"]]},
        "RECORD_LOST": {
            "attempt": running["attempt"],
            "worker": "w",
            "claim": uuid.uuid4(),
            "started": now,
            "id": running["id"],
        },
        "FINISH_ENDED": finish,
        "FINISH_ENDED_MANY": {
            # Two attempts of one run (the second without a last step): the plan, not the outcome.
            **{
                name: [finish[name], None if name in ("step", "pos", "output", "started") else finish[name]]
                for name in runstate.FINISH_ENDED_MANY_ARRAYS
            },
            "user_cap": finish["user_cap"],
            "worker": finish["worker"],
        },
        "FINISH_MOVED": {**finish, "status": "waiting", "attempt_status": "parked", "child": queued["id"]},
        "WAKE_PARENT": {"parent": queued["id"], "child": running["id"], "aging_step": 1.0},
        "WAKE_WAITING": {"aging_step": 1.0},
        "RECOVER_EXPIRED": {"lease": 0.0},
        "CANCEL": {"id": queued["id"]},
        "CANCEL_TREE": {"child": queued["id"]},
        "CANCEL_WORKFLOW_RUNS": {"wf": wf},
        "RETRY": {"id": failed["id"], "max_attempts": 3, "aging_step": 1.0},
    }


def test_every_statement_of_the_state_machine_is_index_bound(big: Big) -> None:
    statements = runstate_statements()
    assert {"CLAIM", "FINISH_ENDED", "CANCEL_WORKFLOW_RUNS"} <= set(statements)
    with big.pool.connection() as conn:
        params = runstate_params(conn, big.settings)
        assert set(params) == set(statements), "a statement of runstate without parameters in this test"
        big.plans.take()
        for name, statement in statements.items():
            # Each runs as its service runs it, and leaves the history as it was.
            with conn.transaction(force_rollback=True):
                conn.execute(statement, params[name])
            plans = big.plans.take()
            assert plans, name
            assert full_scans(plans) == [], name
            if name == "CLAIM":  # the claim function's own queries were planned too
                assert any("FOR UPDATE SKIP LOCKED" in p["Query Text"] for p in plans)


def _services(big: Big) -> dict[str, Callable[[], object]]:
    """What the API, the worker and the scheduler run against runs, by what calls it."""
    pool, settings, fleet = big.pool, big.settings, big.fleet
    busy_wf, owner = fleet.busy
    quiet_wf, _ = fleet.quiet
    some_run = str(uuid.uuid4())
    with pool.connection() as conn:
        row = conn.execute("SELECT id, queued_at FROM runs WHERE workflow_id = %s LIMIT 1", (busy_wf,)).fetchone()
    assert row is not None
    day = datetime.now(UTC) - timedelta(days=1)
    broker = StubBroker()
    broker.declare_queue(RUN_QUEUE)

    def lists() -> None:
        for filters in (
            {},
            {"status": "cancelled"},
            {"workflow_id": quiet_wf, "status": "cancelled"},
            {"workflow_id": busy_wf},
            {"since": day, "until": datetime.now(UTC)},
            {"after": (row["queued_at"], row["id"])},
            {"trigger_type": "webhook"},
            {"trigger_type": "cron", "status": "failed"},
        ):
            queries.list_runs(
                pool,
                owner,  # type: ignore[arg-type]
                limit=50,
                **{
                    "after": None,
                    "workflow_id": None,
                    "status": None,
                    "since": None,
                    "until": None,
                    "trigger_type": None,
                    **filters,
                },  # type: ignore[arg-type]
            )

    def with_conn(action: Callable[[DictConnection], object]) -> Callable[[], object]:
        def run() -> object:
            with pool.connection() as conn:
                return action(conn)

        return run

    return {
        "api: run lists": lists,
        "dashboard: last run of each workflow": lambda: queries.last_runs(pool, owner, [busy_wf, quiet_wf]),  # type: ignore[list-item,arg-type]
        "dashboard: the queue's last hour": lambda: queue_history(pool, 60),
        "api: one run": lambda: queries.get_run(pool, owner, row["id"], with_definition=True),  # type: ignore[arg-type]
        "api: queue stats": lambda: get_queue_stats(pool, settings, LocalRateLimiter(100), redis=False),
        "api: workflows": lambda: queries.list_workflows(
            pool,
            owner,  # type: ignore[arg-type]
            limit=50,
            after=None,
            status=None,
            trigger_type=None,
        ),
        "api: rate limit raised": lambda: change_rate_limit(pool, broker, LocalRateLimiter(1), 2),
        "api: delete a workflow": lambda: queries.delete_workflow(pool, owner, busy_wf),  # type: ignore[arg-type]
        "worker: sub-workflow depth": with_conn(lambda c: c.execute(DEPTH_SQL, {"run": some_run, "limit": 5})),
        "worker: sub-workflow state": with_conn(lambda c: c.execute(CHILD_STATE_SQL, (some_run,))),
        "scheduler: overlap": with_conn(lambda c: firing._busy(c, busy_wf)),
        "scheduler: deferred fires": lambda: firing.release_deferred(pool, broker, settings, {}),
        "api: schedule": lambda: schedule_preview(pool, fleet.cron_workflow, owner),
        "scheduler: alerts": with_conn(lambda c: [rule.measure(c) for rule in alerts.RULES]),
        "scheduler: reconcile": lambda: reconcile(pool, broker, settings),
        "scheduler: recover": lambda: recover_expired(pool, broker, 0.0),
        "scheduler: retention": lambda: prune_history(pool, 29.0),
        "scheduler: fold": lambda: fold_finished(pool),
        "metrics: expired leases": lambda: expired_leases(pool),
    }


def test_the_services_statements_are_index_bound(big: Big) -> None:
    offenders = {}
    for what, action in _services(big).items():
        big.plans.take()
        action()
        plans = big.plans.take()
        assert plans, what
        if scans := full_scans(plans):
            offenders[what] = scans
    assert offenders == {}, "\n".join(f"{what}: {scan}" for what, scans in offenders.items() for scan in scans)


def test_the_finished_counts_are_exact(big: Big) -> None:
    """The counts the queue stats read agree with counting the runs themselves, through finishes
    right at the edge of a window, a retry and deletes, folded or not."""
    exact = """
        SELECT status, count(*) AS n FROM runs
        WHERE (status = 'succeeded' AND finished_at > now() - make_interval(secs => %(succeeded)s))
           OR (status = 'failed' AND finished_at > now() - make_interval(secs => %(failed)s))
        GROUP BY status
    """

    def check(conn: DictConnection) -> None:
        with conn.transaction():  # one now() for both
            counted = {r["status"]: r["n"] for r in conn.execute(FINISHED_COUNTS, FINISHED_WINDOWS)}
            truth = {r["status"]: r["n"] for r in conn.execute(exact, FINISHED_WINDOWS)}
        assert counted["succeeded"] == truth["succeeded"] > 0
        assert counted["failed"] == truth["failed"] > 0

    with psycopg.connect(big.url, autocommit=True, row_factory=dict_row) as conn:
        fold_finish_events(conn)
        check(conn)
        for window in FINISHED_WINDOWS.values():
            # Finishes around the start of the window: its first minute and hour, and either side.
            edge = datetime.now(UTC) - timedelta(seconds=window)
            conn.execute(
                "UPDATE runs SET finished_at = %s + (random() - 0.5) * interval '2 hours' WHERE id IN "
                "(SELECT id FROM runs WHERE status IN ('succeeded', 'failed') LIMIT 2000)",
                (edge,),
            )
        failed = conn.execute(
            "SELECT id, owner_id FROM runs WHERE status = 'failed' AND workflow_id = %s LIMIT 1", (big.fleet.quiet[0],)
        ).fetchone()
        assert failed is not None
        runstate.retry(conn, failed["id"], failed["owner_id"], max_attempts=3, aging_step=1.0)
        conn.execute("DELETE FROM runs WHERE id IN (SELECT id FROM runs WHERE status = 'failed' LIMIT 100)")
        check(conn)  # with the events not folded yet
        fold_finish_events(conn)
        assert conn.execute("SELECT count(*) AS n FROM run_finish_events").fetchone() == {"n": 0}
        check(conn)
