"""Migrations against a real PostgreSQL: concurrent runs, and the schema's own guarantees."""

import subprocess
import sys
import uuid
from collections.abc import Iterator
from importlib import resources

import psycopg
import pytest
from psycopg import sql

from sluice_common.db import migrate, pending_migrations
from tests.conftest import Servers, with_database

MIGRATIONS = resources.files("sluice_common") / "migrations"
EXPECTED_TABLES = {"users", "api_tokens", "workflows", "runs", "run_attempts", "run_steps", "cron_fires"}


@pytest.fixture
def empty_database(servers: Servers) -> Iterator[str]:
    name = f"sluice_test_mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(servers.admin_url, name)
    finally:
        with psycopg.connect(servers.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def migrate_before(url: str, first_new: str) -> None:
    """Apply the migrations that come before ``first_new`` (an id prefix): the database as the
    release before it left it."""
    from yoyo import get_backend, read_migrations

    backend = get_backend("postgresql+psycopg" + url.removeprefix("postgresql"))
    with resources.as_file(MIGRATIONS) as path:
        earlier = read_migrations(str(path)).filter(lambda m: m.id < first_new)
    with backend.lock():
        backend.apply_migrations(backend.to_apply(earlier))
    backend.connection.close()


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {r[0] for r in rows}


def test_parallel_migrate_processes_on_an_empty_database(empty_database: str, service_env: dict[str, str]) -> None:
    env = {**service_env, "DATABASE_URL": empty_database}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sluice_cli", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    # Exactly one of them applied the migration; the others found nothing to do.
    names = sorted(f.name.removesuffix(".sql") for f in MIGRATIONS.iterdir() if f.name.endswith(".sql"))
    assert sum(f"applied {len(names)} migration(s): {', '.join(names)}" in o for o in outputs) == 1
    assert sum("applied 0 migration(s)" in o for o in outputs) == 2
    assert tables(empty_database) >= EXPECTED_TABLES


def test_migrate_again_applies_nothing(database_url: str) -> None:
    assert migrate(database_url) == []


def test_check_and_wait_apply_nothing_and_end_once_the_migrations_are_in(
    empty_database: str, service_env: dict[str, str]
) -> None:
    env = {**service_env, "DATABASE_URL": empty_database}
    names = sorted(f.name.removesuffix(".sql") for f in MIGRATIONS.iterdir() if f.name.endswith(".sql"))
    assert pending_migrations(empty_database) == names

    check = subprocess.run(
        [sys.executable, "-m", "sluice_cli", "migrate", "--check"], env=env, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 1, check.stderr
    assert f"migrations pending: {', '.join(names)}" in check.stderr
    assert tables(empty_database) == set()  # the check wrote nothing, not even yoyo's own tables

    # A new pod's init container: it waits while the migration job has not run, and ends once it has.
    waiter = subprocess.Popen(
        [sys.executable, "-m", "sluice_cli", "migrate", "--wait", "60"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert waiter.stdout is not None
        seen = ""
        while "waiting for migrations" not in seen and waiter.poll() is None:
            seen += waiter.stdout.readline()
        assert waiter.poll() is None, seen
        assert migrate(empty_database) == names
        out = seen + waiter.communicate(timeout=30)[0]
    finally:
        waiter.kill()
    assert waiter.returncode == 0, out
    assert "migrations: up to date" in out
    assert pending_migrations(empty_database) == []


def make_run(conn: psycopg.Connection[tuple[object, ...]], **overrides: object) -> None:
    user = conn.execute("INSERT INTO users (name) VALUES (%s) RETURNING id", (f"u{uuid.uuid4().hex[:8]}",)).fetchone()
    assert user is not None
    wf = conn.execute(
        "INSERT INTO workflows (owner_id, name, trigger_type, trigger, steps) "
        "VALUES (%s, 'w', 'manual', '{\"type\": \"manual\"}', '[]') RETURNING id",
        (user[0],),
    ).fetchone()
    assert wf is not None
    values = {
        "workflow_id": wf[0],
        "owner_id": user[0],
        "workflow_version": 1,
        "trigger_type": "manual",
        "status": "queued",
        "max_attempts": 3,
        **overrides,
    }
    cols = sql.SQL(", ").join(sql.Identifier(k) for k in values)
    params = sql.SQL(", ").join(sql.Placeholder() for _ in values)
    conn.execute(sql.SQL("INSERT INTO runs ({}) VALUES ({})").format(cols, params), list(values.values()))


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"priority": 0}, psycopg.errors.CheckViolation),
        ({"priority": 11}, psycopg.errors.CheckViolation),
        ({"attempt": -1}, psycopg.errors.CheckViolation),
        ({"max_attempts": 0}, psycopg.errors.CheckViolation),
        # States and triggers are enum types: an unknown one is refused as it is read in.
        ({"status": "exploded"}, psycopg.errors.InvalidTextRepresentation),
        ({"trigger_type": "telepathy"}, psycopg.errors.InvalidTextRepresentation),
    ],
)
def test_runs_reject_impossible_values(
    db: psycopg.Connection[tuple[object, ...]], bad: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        make_run(db, **bad)
    db.rollback()


@pytest.mark.parametrize(
    ("table", "bad"),
    [
        ("run_attempts", {"attempt": 0}),
        ("run_steps", {"attempt": 0}),
        ("run_steps", {"position": -1}),
    ],
)
def test_attempts_and_steps_reject_impossible_values(
    db: psycopg.Connection[tuple[object, ...]], table: str, bad: dict[str, object]
) -> None:
    make_run(db)
    run = db.execute("SELECT id FROM runs LIMIT 1").fetchone()
    assert run is not None
    good: dict[str, object] = (
        {"run_id": run[0], "attempt": 1, "status": "running"}
        if table == "run_attempts"
        else {"run_id": run[0], "step_id": "a", "position": 0, "status": "succeeded", "attempt": 1}
    )

    def insert(values: dict[str, object]) -> None:
        db.execute(
            sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                sql.Identifier(table),
                sql.SQL(", ").join(sql.Identifier(k) for k in values),
                sql.SQL(", ").join(sql.Placeholder() for _ in values),
            ),
            list(values.values()),
        )

    insert(good)  # the row itself is fine...
    db.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))
    with pytest.raises(psycopg.errors.CheckViolation):  # ...but not with the impossible value
        insert({**good, **bad})
    db.rollback()


def test_tables_written_per_run_have_no_check_constraints(db: psycopg.Connection[tuple[object, ...]]) -> None:
    # PostgreSQL rebuilds a table's CHECK constraints from their text for each statement writing
    # it: on the tables every run writes, the rules live in enum and domain types (0008, 0010).
    rows = db.execute(
        "SELECT conrelid::regclass::text, conname FROM pg_constraint "
        "WHERE contype = 'c' AND conrelid IN ('runs'::regclass, 'run_attempts'::regclass, 'run_steps'::regclass)"
    ).fetchall()
    assert rows == []
    db.rollback()


def test_idempotency_key_is_unique_per_workflow(db: psycopg.Connection[tuple[object, ...]]) -> None:
    make_run(db, idempotency_key="k1")
    row = db.execute("SELECT workflow_id, owner_id FROM runs WHERE idempotency_key = 'k1'").fetchone()
    assert row is not None
    db.execute(
        "INSERT INTO runs (workflow_id, owner_id, workflow_version, trigger_type, status, max_attempts, "
        "idempotency_key) VALUES (%s, %s, 1, 'manual', 'queued', 3, 'k2')",
        row,
    )
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute(
            "INSERT INTO runs (workflow_id, owner_id, workflow_version, trigger_type, status, max_attempts, "
            "idempotency_key) VALUES (%s, %s, 1, 'manual', 'queued', 3, 'k1')",
            row,
        )
    db.rollback()


def test_a_cron_slot_can_be_claimed_once(db: psycopg.Connection[tuple[object, ...]]) -> None:
    make_run(db)
    wf = db.execute("SELECT workflow_id FROM runs LIMIT 1").fetchone()
    assert wf is not None
    claim = "INSERT INTO cron_fires (workflow_id, scheduled_at, outcome) VALUES (%s, '2026-01-01T00:00Z', 'fired')"
    db.execute(claim, wf)
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute(claim, wf)
    db.rollback()


def test_queries_of_later_issues_use_indexes(db: psycopg.Connection[tuple[object, ...]]) -> None:
    db.execute("SET enable_seqscan = off")
    plans = {
        "unfinished": "SELECT count(*) FROM runs WHERE status IN ('queued','delayed') ORDER BY 1",
        "finished": ("SELECT count(*) FROM runs WHERE status = 'failed' AND finished_at > now() - interval '7 days'"),
        "listing": ("SELECT id FROM runs WHERE owner_id = gen_random_uuid() ORDER BY queued_at DESC, id DESC LIMIT 20"),
        "cron": ("SELECT id FROM workflows WHERE trigger_type = 'cron' AND status = 'active' AND deleted_at IS NULL"),
    }
    for name, query in plans.items():
        plan = "\n".join(r[0] for r in db.execute(f"EXPLAIN {query}").fetchall())  # type: ignore[misc]
        assert "Index" in plan, f"{name}: {plan}"
    db.rollback()


def test_the_claim_reads_the_dispatch_index_in_order_however_stale_the_statistics(
    db: psycopg.Connection[tuple[object, ...]],
) -> None:
    # A burst the statistics do not know of yet (a new table here). Costed on such estimates, the
    # claim's candidate query can come out cheaper as "fetch every waiting run and sort them" than
    # as the ordered index read it is built for, and PL/pgSQL keeps that plan for the session.
    # The function plans with sorting disabled (migration 0009), which leaves only the index read.
    make_run(db)
    db.execute(
        "INSERT INTO runs (workflow_id, owner_id, workflow_version, trigger_type, status, max_attempts, dispatch_at) "
        "SELECT workflow_id, owner_id, 1, 'manual', 'queued', 3, now() + g * interval '1 ms' "
        "FROM runs, generate_series(1, 2000) g"
    )
    row = db.execute("SELECT proconfig FROM pg_proc WHERE proname = 'sluice_claim_runs' AND pronargs = 5").fetchone()
    assert row is not None
    config = list(row[0])  # type: ignore[call-overload]
    assert config == [
        "enable_sort=off",
        "enable_seqscan=off",
        "enable_bitmapscan=off",
        "plan_cache_mode=force_generic_plan",
    ]
    for setting in config:
        name, value = setting.split("=")
        db.execute(f"SET LOCAL {name} = {value}")
    candidate = (
        "SELECT r.id, r.owner_id FROM runs r WHERE r.status IN ('queued', 'delayed') "
        "AND coalesce(r.not_before, '-infinity') <= now() AND NOT r.cancel_requested "
        "AND r.id <> ALL ('{}'::uuid[]) ORDER BY r.dispatch_at, r.id LIMIT 1 FOR UPDATE SKIP LOCKED"
    )
    plan = "\n".join(str(r[0]) for r in db.execute(f"EXPLAIN {candidate}").fetchall())  # type: ignore[misc]
    db.rollback()
    assert "Index Scan using runs_dispatch_idx" in plan, plan
    assert "Sort" not in plan, plan


def test_workers_of_the_previous_release_still_claim(db: psycopg.Connection[tuple[object, ...]]) -> None:
    # During a rolling upgrade, older workers call the three-argument claim of migration 0003.
    make_run(db)
    first = db.execute(
        "SELECT id, owner_id, workflow_id, status, attempt FROM sluice_claim_run('old', 30, 1)"
    ).fetchall()
    assert [(r[3], r[4]) for r in first] == [("running", 1)]
    owner = first[0][1]
    # A second run of the same user, and a run of another user.
    make_run(db, owner_id=owner, workflow_id=first[0][2])
    make_run(db)
    # The same user is at a cap of one: the claim skips its run for the other user's...
    second = db.execute("SELECT owner_id FROM sluice_claim_run('old', 30, 1)").fetchall()
    assert len(second) == 1
    assert second[0][0] != owner
    # ...and then finds nothing it may start, though the first user's run still waits.
    assert db.execute("SELECT * FROM sluice_claim_run('old', 30, 1)").fetchall() == []
    waiting = db.execute("SELECT count(*) FROM runs WHERE owner_id = %s AND status = 'queued'", (owner,)).fetchone()
    assert waiting == (1,)
    db.rollback()
