"""Firing one cron slot: claim it in PostgreSQL and create its run in the same transaction.

The ``cron_fires`` primary key ``(workflow_id, scheduled_at)`` is what makes each slot fire once:
the claim is ``INSERT ... ON CONFLICT DO NOTHING``, and the run row is inserted in the same
transaction, so either both exist or neither does, whatever crashes and however many schedulers
run. The workflow row is read ``FOR SHARE``: a pause or an edit committed first is seen, and one
committed later waits for the fire, so nothing fires after a pause has returned.
The wake-up message is sent after commit (a lost one is re-sent by the reconciler), with the
workflow and the new run in the log context.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import dramatiq

from sluice_common import runstate
from sluice_common.broker import wake
from sluice_common.cron import PlannedFire, iso
from sluice_common.db import DictConnection, Pool
from sluice_common.logs import log_context
from sluice_common.observe import RunCreated, run_events
from sluice_common.runs import NewRun, insert_run
from sluice_common.settings import Settings
from sluice_common.workflow import CronConfig

log = logging.getLogger(__name__)

FireResult = Literal["fired", "catch_up", "missed", "skipped_overlap", "deferred", "duplicate", "stale"]
_UNFINISHED = runstate.sql_list(runstate.UNFINISHED)


@dataclass(frozen=True)
class CronWorkflow:
    """An active cron workflow as the scheduler loaded it."""

    id: str
    owner_id: str
    trigger: dict[str, Any]
    config: CronConfig


def _lock_workflow(conn: DictConnection, wf: CronWorkflow, *, fast_commit: bool = False) -> dict[str, Any] | None:
    """The workflow row if it is still active with the trigger we loaded, locked against changes.

    ``fast_commit``: the transaction's commit does not wait for the WAL flush (set in the same
    round trip).
    """
    row = conn.execute(
        "SELECT version, settings, trigger, status, deleted_at, "
        "set_config('synchronous_commit', CASE WHEN %s THEN 'off' ELSE current_setting('synchronous_commit') END, "
        "true) AS commit_mode FROM workflows WHERE id = %s FOR SHARE",
        (fast_commit, wf.id),
    ).fetchone()
    if row is None or row["deleted_at"] is not None or row["status"] != "active" or row["trigger"] != wf.trigger:
        return None
    return dict(row)


def _busy(conn: DictConnection, workflow_id: str) -> bool:
    row = conn.execute(
        f"SELECT EXISTS (SELECT 1 FROM runs WHERE workflow_id = %s AND status IN {_UNFINISHED}) AS busy",
        (workflow_id,),
    ).fetchone()
    return bool(row and row["busy"])


def _create_run(conn: DictConnection, settings: Settings, wf: CronWorkflow, scheduled_at: datetime, extra: Any) -> UUID:
    data = {"scheduledAt": iso(scheduled_at), "schedule": wf.config.schedule, "timezone": wf.config.timezone, **extra}
    run = insert_run(conn, settings, NewRun(wf.id, wf.owner_id, "cron", data, priority=settings.cron_priority))
    return run.run_id


class _Duplicate(Exception):
    """Raised inside the fire transaction to roll back the run when the slot was already claimed."""


def fire(
    pool: Pool, broker: dramatiq.Broker, settings: Settings, wf: CronWorkflow, planned: PlannedFire
) -> tuple[FireResult, UUID | None]:
    """Claim ``planned`` and create its run (or record why not); return the outcome and the run.

    Four statements in one transaction: lock the workflow, insert the run, insert the claim with
    the run's id (``ON CONFLICT DO NOTHING``; a conflict rolls the run back), commit.
    """
    run_id: UUID | None = None
    try:
        with pool.connection() as conn, conn.transaction():
            # A fire that records a missed slot does not wait for the WAL flush, which makes it
            # several times cheaper: lost in a database crash, it is recorded again, since the
            # scheduler reloads its anchors from the database after any failed fire (see
            # CronScheduler.fire_due). A fire that may start a run waits, as every run's insert
            # does: its run may have started (the claim does not wait for the flush either) and
            # called out before a crash lost both, and the slot, fired again, would then run twice
            # under two run ids, so two idempotency keys.
            row = _lock_workflow(conn, wf, fast_commit=not planned.creates_run)
            if row is None:
                return "stale", None
            outcome: FireResult = planned.outcome
            if planned.creates_run and wf.config.overlap != "allow" and _busy(conn, wf.id):
                outcome = "skipped_overlap"
                if wf.config.overlap == "queue_one":
                    waiting = conn.execute(
                        "SELECT 1 FROM cron_fires WHERE workflow_id = %s AND outcome = 'deferred' LIMIT 1", (wf.id,)
                    ).fetchone()
                    outcome = "skipped_overlap" if waiting else "deferred"
            if outcome in ("fired", "catch_up"):
                extra = {"catchUp": True, "missedSlots": planned.missed_slots} if outcome == "catch_up" else {}
                run_id = _create_run(conn, settings, wf, planned.scheduled_at, extra)
            claimed = conn.execute(
                "INSERT INTO cron_fires (workflow_id, scheduled_at, fired_at, outcome, missed_slots, run_id) "
                "VALUES (%s, %s, clock_timestamp(), %s, %s, %s) ON CONFLICT DO NOTHING RETURNING scheduled_at",
                (wf.id, planned.scheduled_at, outcome, planned.missed_slots, run_id),
            ).fetchone()
            if claimed is None:
                raise _Duplicate
    except _Duplicate:
        return "duplicate", None
    if run_id is not None:
        with log_context(workflow_id=wf.id, run_id=str(run_id)):
            wake(broker, str(run_id))
            run_events.created(RunCreated(str(run_id), wf.id, "cron"))
    return outcome, run_id


def release_deferred(
    pool: Pool, broker: dramatiq.Broker, settings: Settings, workflows: dict[str, CronWorkflow]
) -> tuple[int, int]:
    """Start the deferred fires (overlap ``queue_one``) whose workflow has no unfinished run left.

    Returns ``(started, still_waiting)``. A deferred fire of a workflow that is no longer active
    (or whose trigger changed) is dropped as ``skipped_overlap``.
    """
    started: list[tuple[UUID, str]] = []
    waiting = 0
    with pool.connection() as conn:
        rows = conn.execute("SELECT workflow_id, scheduled_at FROM cron_fires WHERE outcome = 'deferred'").fetchall()
    for pending in rows:
        wf_id = str(pending["workflow_id"])
        with pool.connection() as conn, conn.transaction():
            locked = conn.execute(
                "SELECT 1 FROM cron_fires WHERE workflow_id = %s AND scheduled_at = %s AND outcome = 'deferred' "
                "FOR UPDATE SKIP LOCKED",
                (wf_id, pending["scheduled_at"]),
            ).fetchone()
            if locked is None:
                continue
            wf = workflows.get(wf_id)
            row = _lock_workflow(conn, wf) if wf is not None else None
            if wf is None or row is None:
                conn.execute(
                    "UPDATE cron_fires SET outcome = 'skipped_overlap' WHERE workflow_id = %s AND scheduled_at = %s",
                    (wf_id, pending["scheduled_at"]),
                )
                continue
            if _busy(conn, wf_id):
                waiting += 1
                continue
            run_id = _create_run(conn, settings, wf, pending["scheduled_at"], {"deferred": True})
            conn.execute(
                "UPDATE cron_fires SET outcome = 'fired', run_id = %s, fired_at = clock_timestamp() "
                "WHERE workflow_id = %s AND scheduled_at = %s",
                (run_id, wf_id, pending["scheduled_at"]),
            )
            started.append((run_id, wf_id))
    for run_id, wf_id in started:
        with log_context(workflow_id=wf_id, run_id=str(run_id)):
            wake(broker, str(run_id))
            run_events.created(RunCreated(str(run_id), wf_id, "cron"))
    return len(started), waiting
