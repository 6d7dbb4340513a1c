"""Runs from the producer's side: enqueue, cancel, reconcile, recover, and exact queue stats.

The run row is written (and committed) before its wake-up message is sent, so a crash between
the two leaves a queued run in PostgreSQL that :func:`reconcile` wakes up later: nothing
accepted is lost. The states, the dispatch order and the statements that move a run are in
:mod:`sluice_common.runstate`; this module sends the wake-ups that go with them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import dramatiq
import psycopg
import psycopg_pool
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from sluice_common import runstate, tracing
from sluice_common.broker import RUN_QUEUE, WakeupSender, send_run_message, wake
from sluice_common.db import DictConnection, Pool
from sluice_common.errors import ConflictError, FieldProblem, NotFoundError, ValidationFailed
from sluice_common.groupcommit import GroupCommit
from sluice_common.observe import RunCancelled, RunCreated, run_events
from sluice_common.ratelimit import RateLimiter
from sluice_common.settings import Settings

log = logging.getLogger(__name__)

TRIGGER_TYPES = ("manual", "cron", "webhook", "workflow", "retry")
MAX_DELAY_MS = 7 * 86_400_000  # Dramatiq's limit for one delayed message


@dataclass(frozen=True)
class EnqueuedRun:
    run_id: UUID
    status: str
    created: bool  # False when an idempotency key matched an existing run
    traceparent: str | None = None  # the trace context the new run was stored with


@dataclass(frozen=True)
class NewRun:
    """A run to insert, as a producer asks for it (:func:`enqueue_run`, :func:`insert_run`)."""

    workflow_id: UUID | str
    owner_id: UUID | str
    trigger_type: str = "manual"
    trigger_data: Any = None
    priority: int = 5
    delay_ms: int = 0
    idempotency_key: str | None = None
    traceparent: str | None = None  # the stored trace context (see tracing.creating)
    parent_run_id: UUID | str | None = None
    webhook_secret_hash: bytes | None = None

    def check(self) -> None:
        problems = []
        if not 1 <= self.priority <= 10:
            problems.append(FieldProblem("$.priority", "must be an integer from 1 (first) to 10 (last)"))
        if not 0 <= self.delay_ms <= MAX_DELAY_MS:
            problems.append(FieldProblem("$.delay", f"must be from 0 to {MAX_DELAY_MS} milliseconds (7 days)"))
        if self.trigger_type not in TRIGGER_TYPES:
            problems.append(FieldProblem("$.triggerType", f"must be one of {', '.join(TRIGGER_TYPES)}"))
        if problems:
            raise ValidationFailed(problems)

    @property
    def key(self) -> str | None:
        # Keys are scoped by trigger: whoever holds a webhook URL cannot reach (or take first) the
        # key of the owner's manual runs, nor the other way round.
        return f"{self.trigger_type}:{self.idempotency_key}" if self.idempotency_key is not None else None


def run_id_at(ms: int, random_bits: int) -> UUID:
    """The UUIDv7 (RFC 9562) of Unix time ``ms`` (milliseconds): those 48 bits first, then the
    version, 12 of ``random_bits``, the variant and 62 more of them (74 in all are used)."""
    return UUID(
        int=(ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76
        | (random_bits >> 62 & 0xFFF) << 64
        | 0b10 << 62
        | random_bits & 0x3FFF_FFFF_FFFF_FFFF
    )


def new_run_id() -> UUID:
    """A new run's id: a UUIDv7, so that ids (and the keys of the run's attempts and steps) come in
    time order (see the migration 0018_run_ids_in_time_order, whose column default has the same
    layout). Python has ``uuid.uuid7`` from 3.14 on; until then the layout is the few lines of
    :func:`run_id_at`, with random bits from ``os.urandom``."""
    make = getattr(uuid, "uuid7", None)
    if make is not None:
        made: UUID = make()
        return made
    return run_id_at(time.time_ns() // 1_000_000, int.from_bytes(os.urandom(10), "big"))


def insert_run(conn: DictConnection, settings: Settings, new: NewRun) -> EnqueuedRun:
    """Insert one run row on the caller's connection: the workflow check and the insert are one
    statement. An idempotency hit returns the earlier run (``created`` false). With
    ``webhook_secret_hash`` the workflow must also still have that webhook secret (else
    NotFoundError, as for a workflow that is not there).

    :func:`enqueue_run` runs it in autocommit; the scheduler runs it in the transaction that
    claims a cron fire, commits, then sends the wake-up with
    :func:`~sluice_common.broker.send_run_message`.
    """
    return _create(new, lambda checked: insert_one(conn, settings, checked))


def _create(new: NewRun, insert: Callable[[NewRun], EnqueuedRun]) -> EnqueuedRun:
    """Check a new run, and insert it with ``insert`` inside its creation span, whose trace context it stores."""
    new.check()
    with tracing.creating(new.traceparent) as creation:
        run = insert(dataclasses.replace(new, traceparent=creation.traceparent))
        if run.created:
            creation.created(str(run.run_id), str(new.workflow_id), new.trigger_type)
    return run


def insert_one(conn: DictConnection, settings: Settings, new: NewRun) -> EnqueuedRun:
    """INSERT_RUN for a checked :class:`NewRun` whose trace context is made (see :func:`insert_run`)."""
    params = {
        "id": new_run_id(),
        "wf": str(new.workflow_id),
        "owner": str(new.owner_id),
        "parent": str(new.parent_run_id) if new.parent_run_id else None,
        "trigger": new.trigger_type,
        "data": Jsonb(new.trigger_data if new.trigger_data is not None else {}),
        "priority": new.priority,
        "delay": new.delay_ms,
        "max_attempts": settings.max_attempts,
        "aging_step": settings.priority_aging_seconds,
        "key": new.key,
        "hook": new.webhook_secret_hash,
        "traceparent": new.traceparent,
    }
    # Plain tuples: the hot path of every accepted run skips building a dict per row.
    with conn.cursor(row_factory=tuple_row) as cur:
        found = cur.execute(runstate.INSERT_RUN, params).fetchone()
        assert found is not None
        workflow_status, run_id, status = found
        if workflow_status is None:
            raise NotFoundError("no such workflow")
        if workflow_status != "active":
            raise ConflictError("the workflow is paused; activate it to run it")
        if run_id is not None:
            return EnqueuedRun(run_id, status, created=True, traceparent=new.traceparent)
        existing = cur.execute(
            "SELECT id, status FROM runs WHERE workflow_id = %s AND idempotency_key = %s",
            (params["wf"], params["key"]),
        ).fetchone()
    assert existing is not None
    return EnqueuedRun(existing[0], existing[1], created=False)


def insert_alone(pool: Pool, settings: Settings, new: NewRun) -> EnqueuedRun:
    """:func:`insert_one` in autocommit on a connection of ``pool``: one statement, atomic on its own."""
    with pool.connection() as conn:
        return insert_one(conn, settings, new)


def group_inserts(pool: Pool, settings: Settings) -> GroupCommit[NewRun, EnqueuedRun]:
    """Inserts for the request threads of one API process: the runs asked for while an insert is in
    flight go in together (INSERT_RUN_MANY), a lone one at once (INSERT_RUN); see
    :mod:`sluice_common.groupcommit`. For ``enqueue_run``'s ``inserts``."""

    def many(runs: Sequence[NewRun]) -> list[EnqueuedRun | None]:
        with pool.connection() as conn:
            return insert_many(conn, settings, runs)

    return GroupCommit(lambda new: insert_alone(pool, settings, new), many)


def insert_many(conn: DictConnection, settings: Settings, runs: Sequence[NewRun]) -> list[EnqueuedRun | None]:
    """INSERT_RUN_MANY: checked :class:`NewRun` s in one statement, on the caller's connection.

    Each gets its inserted run, or None where the statement left it out (its workflow is missing
    or paused, its webhook secret rotated, its idempotency key taken): :func:`insert_one` then
    tells which, for that run alone.
    """
    ids = [new_run_id() for _ in runs]
    params = {
        "ids": ids,
        "wf": [str(r.workflow_id) for r in runs],
        "owner": [str(r.owner_id) for r in runs],
        "hook": [r.webhook_secret_hash for r in runs],
        "parent": [str(r.parent_run_id) if r.parent_run_id else None for r in runs],
        "trigger": [r.trigger_type for r in runs],
        "data": [Jsonb(r.trigger_data if r.trigger_data is not None else {}) for r in runs],
        "priority": [r.priority for r in runs],
        "delay": [r.delay_ms for r in runs],
        "key": [r.key for r in runs],
        "traceparent": [r.traceparent for r in runs],
        "max_attempts": settings.max_attempts,
        "aging_step": settings.priority_aging_seconds,
    }
    with conn.cursor(row_factory=tuple_row) as cur:
        inserted = {row[0]: row[1] for row in cur.execute(runstate.INSERT_RUN_MANY, params).fetchall()}
    return [
        EnqueuedRun(run_id, inserted[run_id], created=True, traceparent=r.traceparent) if run_id in inserted else None
        for run_id, r in zip(ids, runs, strict=True)
    ]


def enqueue_run(
    pool: Pool,
    broker: dramatiq.Broker,
    settings: Settings,
    new: NewRun,
    *,
    sender: WakeupSender | None = None,
    inserts: Callable[[NewRun], EnqueuedRun] | None = None,
) -> EnqueuedRun:
    """Write the run row (``queued`` or ``delayed``), commit, then send its wake-up by actor name.

    ``inserts`` writes and commits the row instead of a statement of its own on ``pool`` (the
    API's group commit, :func:`group_inserts`).
    """
    run = _create(new, inserts or (lambda checked: insert_alone(pool, settings, checked)))
    if not run.created:
        return run
    run_events.created(RunCreated(str(run.run_id), str(new.workflow_id), new.trigger_type))
    if sender is not None:
        sender.send(str(run.run_id), delay_ms=new.delay_ms, traceparent=run.traceparent)
    else:
        wake(broker, str(run.run_id), delay_ms=new.delay_ms, traceparent=run.traceparent)
    return run


def cancel_run(pool: Pool, run_id: UUID | str, owner_id: UUID | str) -> str:
    """Cancel a run: a queued, delayed or waiting one never runs again; a running one stops at its next step.

    Returns the run's status after the call (``cancelled``, or ``running`` while it winds down).
    """
    with pool.connection() as conn, conn.transaction():
        status, ended = runstate.cancel(conn, run_id, owner_id)
    report_cancelled(ended)
    return status


def report_cancelled(ended: list[dict[str, Any]]) -> None:
    """Tell the run events of runs a committed cancel ended (see :func:`runstate.ended_by_cancel`)."""
    for row in ended:
        run_events.cancelled(RunCancelled(str(row["id"]), str(row["workflow_id"]), str(row["trigger_type"])))


def change_rate_limit(pool: Pool, broker: dramatiq.Broker, limiter: RateLimiter, per_minute: int) -> int:
    """Set the global rate limit at run time; wake held-back runs that now fit. Returns wake-ups sent.

    Runs held back by the limit sleep until their computed slot; raising the limit sends one
    immediate wake-up per newly free slot so they do not wait for the old schedule.
    """
    before = limiter.limit()
    limiter.set_limit(per_minute)
    extra = per_minute - before
    if extra <= 0:
        return 0
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT count(*) AS due FROM runs WHERE status IN ('queued', 'delayed') "
            "AND coalesce(not_before, '-infinity') <= now()"
        ).fetchone()
    wakeups = min(extra, int(row["due"]) if row else 0)
    for _ in range(wakeups):
        send_run_message(broker, "rate-limit-raised")
    return wakeups


# Reconciling and recovering ---------------------------------------------------------------------


def _pending_messages(broker: dramatiq.Broker) -> tuple[int, bool]:
    """Ready wake-ups the broker holds, and whether that includes those in flight.

    Delayed ones are left out: they may belong to runs cancelled since, so counting them could
    hide a lost wake-up of a run that is due now.
    """
    from dramatiq.brokers.redis import RedisBroker

    if isinstance(broker, RedisBroker):
        ready = broker.client.hlen(f"{broker.namespace}:{RUN_QUEUE}.msgs")  # queued and in flight
        return int(ready), True
    queues = getattr(broker, "queues", {})
    return (queues[RUN_QUEUE].qsize() if RUN_QUEUE in queues else 0), False


def reconcile(pool: Pool, broker: dramatiq.Broker, settings: Settings) -> int:
    """Send wake-ups for runs that PostgreSQL holds but the broker has lost; return how many.

    Counts are compared rather than ids, because a wake-up may start any run: a spare one costs
    a no-op claim, a missing one would strand a run. Needed among the ready wake-ups: one per
    runnable due run (users at their cap excluded: the end of one of their runs wakes the next)
    and, where the broker counts them, one per run in flight. A delayed run whose wake-up was lost
    is woken by a later pass once it is due, so it starts at most one interval late; a due run
    whose delayed wake-up has not moved to the ready queue yet may get a spare one.
    """
    with pool.connection() as conn:
        counts = conn.execute(
            """
            WITH capped AS (
                SELECT owner_id FROM runs WHERE status = 'running'
                GROUP BY owner_id HAVING count(*) >= %(cap)s
            )
            SELECT count(*) FILTER (WHERE status IN ('queued', 'delayed') AND NOT cancel_requested
                                      AND coalesce(not_before, '-infinity') <= now()
                                      AND owner_id NOT IN (SELECT owner_id FROM capped)) AS due,
                   count(*) FILTER (WHERE status = 'running') AS running
            FROM runs WHERE status IN ('queued', 'delayed', 'running')
            """,
            {"cap": settings.user_concurrency},
        ).fetchone()
        assert counts is not None
        held, counts_in_flight = _pending_messages(broker)
        needed = counts["due"] + (counts["running"] if counts_in_flight else 0)
        deficit = min(needed - held, counts["due"])
        rows = (
            conn.execute(
                "SELECT id, traceparent FROM runs WHERE status IN ('queued', 'delayed') "
                "AND coalesce(not_before, '-infinity') <= now() ORDER BY dispatch_at LIMIT %s",
                (deficit,),
            ).fetchall()
            if deficit > 0
            else []
        )
    for row in rows:
        with tracing.sending(row["traceparent"], str(row["id"]), "reconciler"):
            send_run_message(broker, str(row["id"]))
    if rows:
        log.info("reconciler sent %d wake-up(s)", len(rows))
    return len(rows)


def recover_expired(pool: Pool, broker: dramatiq.Broker, lease_seconds: float) -> list[UUID]:
    """Hand back runs whose worker stopped renewing its lease (killed, frozen, cut off).

    The lost attempt counts, so a run that kills its workers cannot loop forever; with attempts
    left it is queued again at its old place in line, and completed steps are not repeated.
    """
    with pool.connection() as conn, conn.transaction():
        rows = conn.execute(runstate.RECOVER_EXPIRED, {"lease": lease_seconds}).fetchall()
    for row in rows:
        if row["status"] == "queued":
            with tracing.sending(row["traceparent"], str(row["id"]), "recovery"):
                send_run_message(broker, str(row["id"]))
    if rows:
        log.warning("recovered %d run(s) from lost workers", len(rows))
    return [row["id"] for row in rows]


class Recovery:
    """:func:`recover_expired` that does not count the time its own process could not reach
    PostgreSQL: after a failed attempt it recovers nothing until a whole lease has passed.

    A database outage cuts every worker off as long as it cuts off the recoverer; their leases
    lapse meanwhile although they are alive and still running their runs. Once the database is
    back they renew within a few seconds, so waiting one lease after the outage (as seen from
    here) lets them, instead of executing their runs a second time elsewhere.
    """

    def __init__(self, pool: Pool, broker: dramatiq.Broker, lease_seconds: float) -> None:
        self._pool = pool
        self._broker = broker
        self._lease = lease_seconds
        self._hold_until = 0.0

    def hold(self) -> None:
        """This process could not reach PostgreSQL just now: recover nothing for a lease from now."""
        self._hold_until = time.monotonic() + self._lease

    def __call__(self) -> list[UUID]:
        if time.monotonic() < self._hold_until:
            return []
        try:
            return recover_expired(self._pool, self._broker, self._lease)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout):
            self.hold()
            raise


# Queue stats -----------------------------------------------------------------------------------

# The windows of the stats' finished counts: ``completed`` counts the runs that succeeded in the
# last 24 hours, ``failed`` those that failed in the last 7 days. The retention job keeps the
# finished counts (migration 0014) of the longest one.
FINISHED_WINDOWS: dict[str, int] = {"succeeded": 86_400, "failed": 7 * 86_400}

# Moves the finished runs' events (written by the triggers of migration 0014) into the per-minute
# and per-hour counts: one statement, so every reader sees each finish exactly once. A concurrent
# fold waits for this one and then finds those events gone.
FOLD_FINISH_EVENTS = """
WITH moved AS (
    DELETE FROM run_finish_events RETURNING status, minute, n
), minutes AS (
    SELECT status, minute, sum(n) AS n FROM moved GROUP BY status, minute
), by_minute AS (
    INSERT INTO run_finish_counts AS c (status, minute, n) SELECT status, minute, n FROM minutes
    ON CONFLICT (status, minute) DO UPDATE SET n = c.n + excluded.n
)
INSERT INTO run_finish_hours AS h (status, hour, n)
SELECT status, sluice_finish_hour(minute), sum(n) FROM minutes GROUP BY 1, 2
ON CONFLICT (status, hour) DO UPDATE SET n = h.n + excluded.n
"""
_FOLD_LOCK_ID = 0x51_1C_E0_00_00_00_02  # any fixed number, the same in every Sluice process

# The finished counts of each window: its whole hours (at most 168 rows), the whole minutes of its
# first hour (at most 59), the events not folded yet (the finishes since the last fold), and the
# runs of its first minute, which the window covers only in part, from runs_finished_idx (at most
# a minute of finishes). None of it grows with the history. With them, the runs parked on a
# sub-workflow run (``waiting``).
FINISHED_COUNTS = """
WITH edge AS (
    SELECT status, since, sluice_finish_minute(since) AS first_minute, sluice_finish_hour(since) AS first_hour
    FROM (SELECT status, now() - make_interval(secs => secs) AS since
          FROM (VALUES ('succeeded'::run_status, %(succeeded)s::float8), ('failed'::run_status, %(failed)s::float8))
               AS w (status, secs)) AS w
)
SELECT e.status,
       (SELECT coalesce(sum(h.n), 0) FROM run_finish_hours h WHERE h.status = e.status AND h.hour > e.first_hour)
       + (SELECT coalesce(sum(c.n), 0) FROM run_finish_counts c
           WHERE c.status = e.status AND c.minute > e.first_minute AND c.minute < e.first_hour + interval '1 hour')
       + (SELECT coalesce(sum(v.n), 0) FROM run_finish_events v
           WHERE v.status = e.status AND v.minute > e.first_minute)
       + (SELECT count(*) FROM runs r WHERE r.status = e.status AND r.finished_at > e.since
            AND r.finished_at < e.first_minute + interval '1 minute') AS n
FROM edge e
UNION ALL
SELECT 'waiting', count(*) FROM runs WHERE status = 'waiting'
"""


def fold_finish_events(conn: DictConnection) -> None:
    """Fold the finished runs' events into the counts, unless another process is folding them
    (the stats read the events it has not folded yet anyway)."""
    with conn.transaction():
        row = conn.execute("SELECT pg_try_advisory_xact_lock(%s) AS mine", (_FOLD_LOCK_ID,)).fetchone()
        if row is not None and row["mine"]:
            conn.execute(FOLD_FINISH_EVENTS)


# A run waiting for a worker: queued, or delayed and due. The stats' (and the queue gauge's)
# ``waiting``, and what the scheduler's backlog alert counts (``sluice_scheduler.alerts``).
READY_TO_START = "status IN ('queued', 'delayed') AND coalesce(not_before, '-infinity') <= now()"


@dataclass(frozen=True)
class QueueStats:
    waiting: int
    active: int
    completed: int  # succeeded in the last 24 hours
    failed: int  # failed in the last 7 days
    delayed: int
    waiting_by_priority: dict[int, int]
    concurrency: int
    rate_limit_per_minute: int
    rate_used: int
    redis: bool
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.active + self.waiting


def get_queue_stats(pool: Pool, settings: Settings, limiter: RateLimiter, *, redis: bool) -> QueueStats:
    """Exact counts from index reads of the unfinished runs and from the finished counts (folded
    first, which keeps the events to add few): neither grows with the history."""
    with pool.connection() as conn:
        fold_finish_events(conn)
        live = conn.execute(
            f"""
            SELECT priority,
                   count(*) FILTER (WHERE {READY_TO_START}) AS waiting,
                   count(*) FILTER (WHERE status = 'delayed' AND not_before > now()) AS delayed,
                   count(*) FILTER (WHERE status = 'running') AS active
            FROM runs WHERE status IN ('queued', 'delayed', 'running') GROUP BY priority
            """
        ).fetchall()
        counts = {str(r["status"]): int(r["n"]) for r in conn.execute(FINISHED_COUNTS, FINISHED_WINDOWS).fetchall()}
    return QueueStats(
        waiting=sum(r["waiting"] for r in live),
        active=sum(r["active"] for r in live),
        completed=counts["succeeded"],
        failed=counts["failed"],
        delayed=sum(r["delayed"] for r in live),
        waiting_by_priority={int(r["priority"]): int(r["waiting"]) for r in live if r["waiting"]},
        concurrency=settings.concurrency,
        rate_limit_per_minute=limiter.limit(),
        rate_used=limiter.used(),
        redis=redis,
        extra={"waitingOnSubWorkflows": counts["waiting"]},
    )


@dataclass(frozen=True)
class QueueMinute:
    """One minute of the queue's recent history (all users: aggregate counts, like the stats)."""

    at: datetime  # the minute's end
    depth: int  # runs due and not started at that moment
    succeeded: int  # runs that ended in the minute, by outcome
    failed: int
    cancelled: int


def queue_history(pool: Pool, minutes: int = 60) -> list[QueueMinute]:
    """The last ``minutes`` minutes of throughput and queue depth, oldest first.

    Both come from the runs themselves, so every API process draws the same chart without
    sampling anything: the depth at a minute's end counts the runs due by then (queued, or
    delayed until before then) and not yet started or ended. The rows read are the unfinished runs
    and those that ended in the window, each set through its index; the database counts them
    once into per-minute arrivals, departures and endings (the depth is the running difference),
    so the cost grows with the runs of the hour, not with the minutes times the runs.
    """
    with pool.connection() as conn:
        first_row = conn.execute(
            "SELECT date_trunc('minute', now()) + make_interval(mins => %s) AS first", (2 - minutes,)
        ).fetchone()
        assert first_row is not None
        first: datetime = first_row["first"]  # the end of the oldest minute
        last = first + timedelta(minutes=minutes - 1)
        rows = conn.execute(
            """
            WITH recent AS (
                SELECT greatest(queued_at, coalesce(not_before, queued_at)) AS due,
                       coalesce(started_at, finished_at) AS left_at, status, finished_at
                FROM runs WHERE status IN ('queued', 'delayed', 'running')
                UNION ALL
                SELECT greatest(queued_at, coalesce(not_before, queued_at)), coalesce(started_at, finished_at),
                       status, finished_at
                FROM runs WHERE status = 'waiting'
                UNION ALL
                SELECT greatest(queued_at, coalesce(not_before, queued_at)), coalesce(started_at, finished_at),
                       status, finished_at
                FROM runs WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished_at > %(since)s
            )
            SELECT 'in' AS kind, greatest(ceil(extract(epoch FROM due - %(first)s) / 60), 0)::int AS k,
                   NULL::text AS status, count(*) AS n
            FROM recent WHERE due <= %(last)s AND (left_at IS NULL OR left_at > due) GROUP BY 2
            UNION ALL
            SELECT 'out', greatest(ceil(extract(epoch FROM left_at - %(first)s) / 60), 0)::int, NULL, count(*)
            FROM recent WHERE due <= %(last)s AND left_at > due AND left_at <= %(last)s GROUP BY 2
            UNION ALL
            SELECT 'ended', ceil(extract(epoch FROM finished_at - %(first)s) / 60)::int, status::text, count(*)
            FROM recent
            WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished_at > %(since)s
              AND finished_at <= %(last)s
            GROUP BY 2, 3
            """,
            {"first": first, "last": last, "since": first - timedelta(minutes=1)},
        ).fetchall()
    arrived, left = [0] * minutes, [0] * minutes
    ended: dict[str, list[int]] = {s: [0] * minutes for s in ("succeeded", "failed", "cancelled")}
    for row in rows:
        k, n = int(row["k"]), int(row["n"])
        if not 0 <= k < minutes:
            continue
        if row["kind"] == "in":
            arrived[k] += n
        elif row["kind"] == "out":
            left[k] += n
        else:
            ended[row["status"]][k] += n
    history, depth = [], 0
    for k in range(minutes):
        depth += arrived[k] - left[k]
        history.append(
            QueueMinute(
                first + timedelta(minutes=k), depth, ended["succeeded"][k], ended["failed"][k], ended["cancelled"][k]
            )
        )
    return history
