"""PostgreSQL access: connection pools and schema migrations.

Pools are opened by a service after start-up (never at import). Migrations are SQL files in
``sluice_common/migrations`` applied by yoyo; :func:`migrate` serialises concurrent callers with a
PostgreSQL advisory lock, because yoyo's own lock table is created without one and two first
runs at once can collide on it. After the migrations it installs the run state machine's SQL
functions (the claim, the dispatch rule) from :mod:`sluice_common.runstate`, where they live.
:func:`pending_migrations` tells, without writing anything, which migrations a database lacks
(``sluice migrate --check`` / ``--wait``: new pods wait for the migration job).
"""

from __future__ import annotations

import logging
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool
from psycopg_pool.base import AttemptWithBackoff

from sluice_common.errors import InfrastructureError
from sluice_common.settings import Settings

log = logging.getLogger(__name__)

DictConnection = psycopg.Connection[DictRow]
Pool = ConnectionPool[DictConnection]
"""A pool whose rows are dicts: the one pool type of Sluice."""

# Any fixed 64-bit number works; it only has to be the same in every Sluice process.
_MIGRATION_LOCK_ID = 0x51_1C_E0_00_00_00_01


def _configure(conn: DictConnection) -> None:
    # Every Sluice query is a short one: JIT compilation (PostgreSQL's default above a plan cost
    # of 100,000) would only add its compile time, tens of milliseconds, to each execution of a
    # statement the planner happened to overestimate. A SET rather than a startup option, which
    # connection poolers such as PgBouncer refuse.
    conn.execute("SET jit = off")


def open_pool(
    settings: Settings, database_url: str, *, name: str = "sluice", max_size: int | None = None, wait: bool = True
) -> Pool:
    """Open a connection pool and wait until it holds its minimum of connections (``wait``), or
    raise when it cannot within 15 s. Without ``wait`` the pool connects in the background, and a
    caller meanwhile waits for a connection up to ``db_pool_timeout_seconds`` as in an outage."""
    # psycopg_pool retries a lost connection with a backoff from 1 s that doubles without a cap:
    # after a 40-second outage the next attempt could be 16 s or more away, and services resumed
    # up to 20 s after PostgreSQL was back. Retrying every half second costs a refused connection
    # attempt per pool task during an outage, and brings a service back within a second of the
    # database. The pool has no setting for it; these are its retry class's constants.
    AttemptWithBackoff.INITIAL_DELAY = 0.5
    AttemptWithBackoff.DELAY_BACKOFF = 1.0
    pool: Pool = ConnectionPool(
        database_url,
        connection_class=DictConnection,
        min_size=settings.db_pool_min,
        max_size=max(max_size or settings.db_pool_max, settings.db_pool_min),
        # Autocommit: a single statement costs one round trip; multi-statement work opens
        # an explicit ``conn.transaction()``.
        kwargs={"row_factory": dict_row, "autocommit": True},
        configure=_configure,
        name=name,
        timeout=settings.db_pool_timeout_seconds,
        open=False,
    )
    try:
        pool.open(wait=wait, timeout=15)
    except Exception as exc:
        pool.close()
        raise InfrastructureError(f"cannot connect to PostgreSQL: {exc}") from exc
    return pool


def _yoyo_uri(database_url: str) -> str:
    parts = urlsplit(database_url)
    return urlunsplit(("postgresql+psycopg", *parts[1:]))


def _migration_ids() -> list[str]:
    folder = resources.files("sluice_common") / "migrations"
    return sorted(f.name.removesuffix(".sql") for f in folder.iterdir() if f.name.endswith(".sql"))


def pending_migrations(database_url: str) -> list[str]:
    """The ids of this version's migrations that the database has not applied, oldest first.

    Reads yoyo's record of applied migrations directly: yoyo's own API creates its tables on first
    use, and a check (run by every new pod) must write nothing.
    """
    from yoyo.migrations import default_migration_table

    table = sql.Identifier(default_migration_table)
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            if conn.execute("SELECT to_regclass(%s)", (default_migration_table,)).fetchone() == (None,):
                applied: set[str] = set()
            else:
                rows = conn.execute(sql.SQL("SELECT migration_id FROM {}").format(table)).fetchall()
                applied = {row[0] for row in rows}
    except psycopg.OperationalError as exc:
        raise InfrastructureError(f"cannot connect to PostgreSQL: {exc}") from exc
    return [m for m in _migration_ids() if m not in applied]


def migrate(database_url: str) -> list[str]:
    """Apply pending migrations; return the ids applied. Safe to run from several processes."""
    from yoyo import get_backend, read_migrations

    try:
        lock_conn = psycopg.connect(database_url, autocommit=True)
    except psycopg.OperationalError as exc:
        raise InfrastructureError(f"cannot connect to PostgreSQL: {exc}") from exc
    with lock_conn:
        lock_conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK_ID,))
        try:
            backend = get_backend(_yoyo_uri(database_url))
            try:
                with resources.as_file(resources.files("sluice_common") / "migrations") as path:
                    migrations = read_migrations(str(path))
                    with backend.lock():
                        pending = backend.to_apply(migrations)
                        backend.apply_migrations(pending)
                applied = [m.id for m in pending]
            finally:
                backend.connection.close()
            # The run state machine's functions live with its statements, not in a migration.
            from sluice_common.runstate import install_functions

            install_functions(lock_conn)
        finally:
            lock_conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK_ID,))
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    return applied
