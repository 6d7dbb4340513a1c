"""A runs table of realistic size for the scale tests and ``bench/scale.py``, loaded with COPY.

The history looks like a busy installation's: finished runs spread over the last 30 days
(succeeded mostly, some failed, few cancelled), most of them in one busy workflow, their attempts
and steps, and the cron fires of a cron workflow that started some of them. :func:`add_history`
appends to what is there, so a bench can grow one table step by step.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from sluice_common.runs import FOLD_FINISH_EVENTS, run_id_at

HISTORY_DAYS = 30
USERS = 20
WORKFLOWS_PER_USER = 10
BATCH = 50_000


@dataclass(frozen=True)
class Fleet:
    """The users and workflows the history belongs to."""

    owners: list[str]
    workflows: list[tuple[str, str]]  # (workflow id, owner id); the first is the busy one
    cron_workflow: str  # a workflow of the first owner whose fires started some of the runs

    @property
    def busy(self) -> tuple[str, str]:
        return self.workflows[0]

    @property
    def quiet(self) -> tuple[str, str]:
        """A workflow of the busy one's owner with a long history but no cancelled run."""
        return self.workflows[1]


def make_fleet(conn: psycopg.Connection[Any]) -> Fleet:
    owners: list[str] = []
    workflows: list[tuple[str, str]] = []
    steps = Jsonb([{"id": "a", "type": "transform", "config": {"value": 1}}])
    for u in range(USERS):
        row = conn.execute(
            "INSERT INTO users (name) VALUES (%s) RETURNING id", (f"scale-{u}-{uuid.uuid4().hex[:6]}",)
        ).fetchone()
        assert row is not None
        owner = str(row[0])
        owners.append(owner)
        for w in range(WORKFLOWS_PER_USER):
            wf = conn.execute(
                "INSERT INTO workflows (owner_id, name, trigger_type, trigger, steps) "
                "VALUES (%s, %s, 'manual', %s, %s) RETURNING id",
                (owner, f"wf-{w}", Jsonb({"type": "manual"}), steps),
            ).fetchone()
            assert wf is not None
            workflows.append((str(wf[0]), owner))
    cron = conn.execute(
        "INSERT INTO workflows (owner_id, name, trigger_type, trigger, steps) "
        "VALUES (%s, 'cron', 'cron', %s, %s) RETURNING id",
        (owners[0], Jsonb({"type": "cron", "config": {"schedule": "* * * * *"}}), steps),
    ).fetchone()
    assert cron is not None
    conn.commit()
    return Fleet(owners, workflows, str(cron[0]))


def _pick(rng: random.Random, fleet: Fleet) -> tuple[str, str]:
    # Two fifths of the history are the busy workflow's, a fifth the quiet one's; the rest is
    # spread over the others.
    roll = rng.random()
    if roll < 0.4:
        return fleet.busy
    if roll < 0.6:
        return fleet.quiet
    return fleet.workflows[rng.randrange(2, len(fleet.workflows))]


def add_history(conn: psycopg.Connection[Any], fleet: Fleet, count: int, *, seed: int = 0) -> None:
    """Append ``count`` finished runs (with an attempt and a step each; a tenth of them started
    by a cron fire, and their finished counts) in batches of COPY, and ANALYZE."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    span = HISTORY_DAYS * 86400.0
    done = 0
    while done < count:
        n = min(BATCH, count - done)
        runs, attempts, steps, fires = [], [], [], []
        counts: Counter[tuple[str, str]] = Counter()
        for _ in range(n):
            wf, owner = _pick(rng, fleet)
            finished = now - timedelta(seconds=rng.random() * span)
            queued = finished - timedelta(seconds=1 + rng.random() * 5)
            run_id = str(run_id_at(int(queued.timestamp() * 1000), rng.getrandbits(74)))  # as the services make them
            roll = rng.random()
            if roll < 0.9:
                status, error = "succeeded", "\\N"
            elif roll < 0.999 or wf == fleet.quiet[0]:
                status, error = "failed", "boom"
            else:
                status, error = "cancelled", "cancelled before it started"
            trigger = "manual"
            if rng.random() < 0.1:
                trigger = "cron"
                fires.append(f"{fleet.cron_workflow}\t{queued.isoformat()}\t{run_id}\n")
            q, f = queued.isoformat(), finished.isoformat()
            if status != "cancelled":
                counts[status, finished.replace(second=0, microsecond=0).isoformat()] += 1
            runs.append(
                f"{run_id}\t{wf}\t{owner}\t1\t{trigger}\t{rng.randint(1, 10)}\t{status}\t1\t3\t{q}\t{q}\t{f}\t{f}\t{q}"
                f"\t{error}\n"
            )
            att = "succeeded" if status == "succeeded" else ("failed" if status == "failed" else "cancelled")
            attempts.append(f"{run_id}\t1\t{att}\t{q}\t{f}\n")
            steps.append(f"{run_id}\ta\t0\t{'succeeded' if status == 'succeeded' else 'failed'}\t1\t{q}\t{f}\n")
        with conn.cursor() as cur:
            # The per-row trigger that counts finished runs would cost more than the COPY: it is
            # off for this transaction only, and the batch's counts are added as one event a
            # minute, folded at the end.
            cur.execute("ALTER TABLE runs DISABLE TRIGGER runs_count_inserted")
            with cur.copy(
                "COPY runs (id, workflow_id, owner_id, workflow_version, trigger_type, priority, status, attempt,"
                " max_attempts, queued_at, started_at, finished_at, updated_at, dispatch_at, error) FROM STDIN"
            ) as copy:
                copy.write("".join(runs))
            cur.execute("ALTER TABLE runs ENABLE TRIGGER runs_count_inserted")
            with cur.copy("COPY run_finish_events (status, minute, n) FROM STDIN") as copy:
                copy.write("".join(f"{st}\t{minute}\t{n}\n" for (st, minute), n in counts.items()))
            with cur.copy("COPY run_attempts (run_id, attempt, status, started_at, finished_at) FROM STDIN") as copy:
                copy.write("".join(attempts))
            with cur.copy(
                "COPY run_steps (run_id, step_id, position, status, attempt, started_at, finished_at) FROM STDIN"
            ) as copy:
                copy.write("".join(steps))
            # Scheduled times are unique per workflow: a fire that would repeat one is left out.
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS scale_fires (workflow_id uuid, scheduled_at timestamptz, run_id uuid)"
            )
            cur.execute("TRUNCATE scale_fires")
            with cur.copy("COPY scale_fires (workflow_id, scheduled_at, run_id) FROM STDIN") as copy:
                copy.write("".join(fires))
            cur.execute(
                "INSERT INTO cron_fires (workflow_id, scheduled_at, outcome, run_id) "
                "SELECT workflow_id, scheduled_at, 'fired', run_id FROM scale_fires ON CONFLICT DO NOTHING"
            )
        conn.commit()
        done += n
    conn.execute(FOLD_FINISH_EVENTS)
    conn.commit()
    # A service appends a few events a second and folds them as often; a load appends a minute's
    # worth of history at a time, and the folded ones would be left for autovacuum to find.
    conn.autocommit = True
    try:
        conn.execute("VACUUM run_finish_events")
        for table in ("runs", "run_attempts", "run_steps", "cron_fires", "run_finish_counts", "run_finish_hours"):
            conn.execute(f"ANALYZE {table}")
    finally:
        conn.autocommit = False
