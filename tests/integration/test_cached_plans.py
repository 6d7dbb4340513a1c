"""The run statements' cached plans are index-bound from the start.

psycopg prepares a statement on its fifth execution, and PostgreSQL may then keep one generic plan
for it in the session, made with the table sizes of that moment. Nothing but an ANALYZE (or DDL)
of a table replaces that plan: where autovacuum is off, or has not come round yet, a plan made
while ``runs`` held a few rows is still used once it holds millions. The worker's batch finish,
planned so, joined its arrays to a sequential scan of ``runs``, and every batch read the whole
table (on a server without autovacuum, 2,419 times in a short run of ``bench/e2e.py``).

Here each statement of :mod:`sluice_common.runstate` is planned generically on the tables of a
new installation (a few rows, never analyzed): no plan may read a large table sequentially.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from sluice_common import runstate
from sluice_common.db import DictConnection
from sluice_common.runs import NewRun, insert_run
from sluice_common.settings import Settings, load_settings
from tests.integration.test_scale_plans import (
    LARGE,
    Plans,
    explain_everything,
    need_auto_explain,
    runstate_params,
    runstate_statements,
)
from tests.scaledata import make_fleet

# CANCEL_TREE's recursive join is planned from the tables' statistics, which tables never analyzed
# lack: even planned afresh on grown tables it reads runs whole until they are analyzed. Where
# statistics exist it looks the tree up by runs_parent_idx (test_scale_plans); a rare cancel of a
# parent is not the repeated plan this test is about.
PLANNED_FROM_STATISTICS = frozenset({"CANCEL_TREE"})


def _statements() -> dict[str, str]:
    skipped = PLANNED_FROM_STATISTICS | runstate.UNPREPARED  # planned afresh at each execution
    return {name: sql for name, sql in runstate_statements().items() if name not in skipped}


def _scans(plans: list[dict[str, Any]]) -> list[str]:
    """``table: query`` for each sequential scan of a large table in the plans."""
    found = []
    for p in plans:
        stack = [p["Plan"]]
        while stack:
            node = stack.pop()
            stack.extend(node.get("Plans", []))
            if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in LARGE:
                found.append(f"{node['Relation Name']}: {' '.join(p['Query Text'].split())[:200]}")
    return found


def _add_finished(conn: psycopg.Connection[Any], workflow_id: str, count: int) -> None:
    """``count`` finished runs of the workflow (a tenth failed), with an attempt and a step each,
    left unanalyzed (``tests.scaledata`` analyzes what it loads)."""
    conn.execute(
        """
        WITH made AS (
            INSERT INTO runs (workflow_id, owner_id, workflow_version, trigger_type, status, attempt, max_attempts,
                              started_at, finished_at, dispatch_at)
            SELECT w.id, w.owner_id, w.version, 'manual',
                   CASE WHEN g %% 10 = 0 THEN 'failed' ELSE 'succeeded' END::run_status, 1, 3, now(), now(), now()
            FROM workflows w, generate_series(1, %(count)s) AS g
            WHERE w.id = %(wf)s
            RETURNING id, status, started_at
        ), attempts AS (
            INSERT INTO run_attempts (run_id, attempt, status, started_at, finished_at)
            SELECT id, 1, status::text::attempt_status, started_at, started_at FROM made
        )
        INSERT INTO run_steps (run_id, step_id, position, status, attempt, started_at, finished_at)
        SELECT id, 'a', 0, status::text::step_status, 1, started_at, started_at FROM made
        """,
        {"count": count, "wf": workflow_id},
    )


@dataclass(frozen=True)
class Small:
    conn: DictConnection
    settings: Settings
    plans: Plans
    params: dict[str, dict[str, Any]]


@pytest.fixture
def small(fresh_database: str) -> Iterator[Small]:
    """A new installation's tables (a few runs of each kind, never analyzed), and a session that
    plans generically and shows the plans it executes."""
    need_auto_explain(fresh_database)
    settings = load_settings({"DATABASE_URL": fresh_database, "SLUICE_USER_CONCURRENCY": "1000"})
    with (
        psycopg.connect(fresh_database, autocommit=True) as setup,
        psycopg.Connection.connect(fresh_database, autocommit=True, row_factory=dict_row) as conn,
    ):
        for table in sorted(LARGE):  # what the test plans on stays as it was written
            setup.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
        fleet = make_fleet(setup)
        wf, owner = fleet.workflows[2]
        _add_finished(setup, wf, 20)
        for _ in range(4):
            insert_run(conn, settings, NewRun(wf, owner))
        claim = {"worker": "w", "lease": 30.0, "user_cap": 1000, "exclusive": False, "count": 2}
        conn.execute(runstate.CLAIM, claim).fetchall()
        conn.execute("SET jit = off")
        conn.execute("SET plan_cache_mode = force_generic_plan")
        plans = Plans()
        explain_everything(conn, plans)
        yield Small(conn, settings, plans, runstate_params(conn, settings))


def test_the_generic_plans_made_on_a_new_installations_tables_are_index_bound(small: Small) -> None:
    statements = _statements()
    assert {"CLAIM", "FINISH_ENDED_MANY", "INSERT_RUN_MANY"} <= set(statements)
    found = {}
    for name, statement in statements.items():
        small.plans.take()
        with small.conn.transaction(force_rollback=True):  # each leaves the tables as they were
            small.conn.execute(statement, small.params[name], prepare=True)
        plans = small.plans.take()
        assert plans, name
        if name in ("CLAIM", "FINISH_ENDED_MANY"):  # the functions' own statements were planned too
            assert any(p["Query Text"].lstrip().startswith(("SELECT r.id", "WITH req")) for p in plans), name
        found[name] = _scans(plans)
    assert {name: scans for name, scans in found.items() if scans} == {}
