"""Workflow versions in PostgreSQL: written for every save by whoever saves, immutable, migrated
from earlier releases, and pruned only when no run needs them."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from sluice_common.db import migrate
from sluice_scheduler.maintenance import prune_deleted_workflows, prune_history
from tests.integration.conftest import Pipeline
from tests.integration.test_migrations import empty_database, migrate_before  # noqa: F401 - a fixture

STEP = [{"id": "a", "type": "transform", "config": {"value": 1}}]


def versions(pipeline: Pipeline, workflow_id: str) -> list[tuple[int, list[dict[str, object]]]]:
    with pipeline.pool.connection() as conn:
        rows = conn.execute(
            "SELECT version, steps FROM workflow_versions WHERE workflow_id = %s ORDER BY version", (workflow_id,)
        ).fetchall()
    return [(r["version"], r["steps"]) for r in rows]


def test_every_writer_of_a_workflow_stores_its_versions(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, STEP)
    changed = [{"id": "b", "type": "transform", "config": {"value": 2}}]
    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE workflows SET steps = %s, version = version + 1 WHERE id = %s", (Jsonb(changed), wf))
        # Pausing changes no definition: no new version.
        conn.execute("UPDATE workflows SET status = 'paused' WHERE id = %s", (wf,))
    assert versions(pipeline, wf) == [(1, STEP), (2, changed)]


def test_a_version_cannot_be_changed_in_place(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, STEP)
    with pipeline.pool.connection() as conn, pytest.raises(psycopg.errors.IntegrityConstraintViolation):
        conn.execute("UPDATE workflows SET steps = '[]' WHERE id = %s", (wf,))
    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE workflows SET version = 2, name = 'second' WHERE id = %s", (wf,))
    # Going back to a number that exists would rewrite that version: refused.
    with pipeline.pool.connection() as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("UPDATE workflows SET version = 1, name = 'again' WHERE id = %s", (wf,))
    assert versions(pipeline, wf) == [(1, STEP), (2, STEP)]


def test_retention_keeps_versions_that_runs_of_a_deleted_workflow_reference(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, STEP)
    with pipeline.pool.connection() as conn:
        for n in (2, 3):
            conn.execute("UPDATE workflows SET version = %s, name = %s WHERE id = %s", (n, f"v{n}", wf))
        for version, age_days in ((2, 40), (3, 1)):
            conn.execute(
                "INSERT INTO runs (workflow_id, owner_id, workflow_version, trigger_type, status, max_attempts, "
                "finished_at) VALUES (%s, %s, %s, 'manual', 'succeeded', 3, now() - make_interval(days => %s))",
                (wf, owner, version, age_days),
            )
    # A live workflow keeps its whole history.
    assert prune_deleted_workflows(pipeline.pool) == 0
    assert [v for v, _ in versions(pipeline, wf)] == [1, 2, 3]

    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE workflows SET deleted_at = now() WHERE id = %s", (wf,))
    assert prune_history(pipeline.pool, 30) == (1, 0)  # the 40-day-old run goes, and versions 1 and 2
    assert [v for v, _ in versions(pipeline, wf)] == [3]
    with pipeline.pool.connection() as conn:
        conn.execute("DELETE FROM runs WHERE workflow_id = %s", (wf,))
    assert prune_deleted_workflows(pipeline.pool) == 1
    with pipeline.pool.connection() as conn:
        assert conn.execute("SELECT count(*) AS n FROM workflows WHERE id = %s", (wf,)).fetchone() == {"n": 0}


def test_the_migration_gives_existing_workflows_their_versions(empty_database: str) -> None:  # noqa: F811
    migrate_before(empty_database, "0011")
    with psycopg.connect(empty_database, autocommit=True) as conn:
        owner = conn.execute("INSERT INTO users (name) VALUES ('old') RETURNING id").fetchone()
        assert owner is not None
        conn.execute(
            "INSERT INTO workflows (owner_id, name, trigger_type, trigger, steps, version) "
            "VALUES (%s, 'edited twice', 'manual', '{\"type\": \"manual\"}', %s, 3)",
            (owner[0], Jsonb(STEP)),
        )
    assert "0011_workflow_versions" in migrate(empty_database)
    with psycopg.connect(empty_database) as conn:
        rows = conn.execute("SELECT version, name, steps FROM workflow_versions ORDER BY version").fetchall()
    # Runs queued before the upgrade ran whatever was current: every earlier number gets that definition.
    assert rows == [(1, "edited twice", STEP), (2, "edited twice", STEP), (3, "edited twice", STEP)]
