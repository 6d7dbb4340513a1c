"""Maintenance jobs the scheduler's leader runs on fixed schedules.

- ``recover``, ``reconcile`` and ``fold`` every ``SLUICE_RECONCILE_SECONDS``: runs whose worker died
  go back to the queue; runs PostgreSQL holds but Redis lost get their wake-up again; the finished
  runs' events are folded into the queue stats' counts.
- ``prune`` every hour: finished runs older than ``SLUICE_RUN_RETENTION_DAYS`` (their attempts
  and steps go with them) and old cron fires, in small batches so no long lock is held, and the
  finished counts older than the queue stats' longest window; then the versions of
  deleted workflows that no remaining run executed, and deleted workflows without runs.
- ``alerts`` every ``SLUICE_ALERT_INTERVAL_SECONDS``, only when ``SLUICE_ALERT_WEBHOOK_URL`` is set:
  the alert rules evaluated and their changes posted (:mod:`sluice_scheduler.alerting`).

Each job slot is claimed (in Redis, next to the lease) before it runs, so a job runs once per
slot even when leadership changes hands in the middle of an interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import dramatiq

from sluice_common import runstate
from sluice_common.db import Pool
from sluice_common.runs import FINISHED_WINDOWS, Recovery, fold_finish_events, reconcile
from sluice_common.settings import Settings
from sluice_scheduler.alerting import AlertJob, AlertStore
from sluice_scheduler.leadership import Lease

log = logging.getLogger(__name__)

PRUNE_INTERVAL_SECONDS = 3600.0
PRUNE_BATCH = 1000
_TERMINAL = runstate.sql_list(runstate.TERMINAL)


def prune_history(pool: Pool, retention_days: float, *, batch: int = PRUNE_BATCH) -> tuple[int, int]:
    """Delete finished runs and cron fires older than the retention; return ``(runs, fires)``.

    A workflow's latest fire is kept (it is where its schedule resumes after a restart), and so
    are rows that record missed slots (the missed count stays visible).
    """
    runs = fires = 0
    while True:
        # The batch's ids as an array, looked up one by one in the primary key: as a join of the
        # batch to runs, a plan costed close to it hashed the batch against a sequential scan of
        # every run. Unprepared, so that each batch is planned with its cut-off and size: the
        # generic plan of a prepared statement, which knows neither, read runs in physical order
        # until it had found a batch.
        with pool.connection() as conn:
            cur = conn.execute(
                f"""
                DELETE FROM runs WHERE id = ANY (ARRAY(
                    SELECT id FROM runs
                    WHERE status IN {_TERMINAL}
                      AND finished_at < now() - make_interval(secs => %(secs)s)
                    LIMIT %(batch)s))
                """,
                {"secs": retention_days * 86400, "batch": batch},
                prepare=False,
            )
        runs += cur.rowcount
        if cur.rowcount < batch:
            break
    while True:
        # The batch's rows by their physical address: joined back on their key, a batch the
        # planner guessed small was matched against a sequential scan of all fires.
        with pool.connection() as conn:
            cur = conn.execute(
                """
                DELETE FROM cron_fires WHERE ctid = ANY (ARRAY(
                    SELECT f.ctid FROM cron_fires f
                    WHERE f.missed_slots = 0 AND f.outcome <> 'deferred'
                      AND f.scheduled_at < now() - make_interval(secs => %(secs)s)
                      AND f.scheduled_at < (SELECT max(g.scheduled_at) FROM cron_fires g
                                            WHERE g.workflow_id = f.workflow_id)
                    LIMIT %(batch)s))
                """,
                {"secs": retention_days * 86400, "batch": batch},
            )
        fires += cur.rowcount
        if cur.rowcount < batch:
            break
    with pool.connection() as conn:
        # The finished counts outside every window of the queue stats.
        keep = max(FINISHED_WINDOWS.values())
        conn.execute("DELETE FROM run_finish_counts WHERE minute < now() - make_interval(secs => %s + 60)", (keep,))
        conn.execute("DELETE FROM run_finish_hours WHERE hour < now() - make_interval(secs => %s + 3600)", (keep,))
    versions = prune_deleted_workflows(pool)
    if runs or fires or versions:
        log.info(
            "pruned %d run(s), %d cron fire(s) older than %g day(s) and %d version(s) of deleted workflows",
            runs,
            fires,
            retention_days,
            versions,
        )
    return runs, fires


def prune_deleted_workflows(pool: Pool) -> int:
    """Drop what no run needs any more of deleted workflows; return how many versions went.

    A deleted workflow keeps the versions its remaining runs executed (they stay readable with
    the runs); once its last run is pruned, the workflow row goes, and its versions with it.
    """
    with pool.connection() as conn, conn.transaction():
        # Each version is checked with an index probe of its workflow's runs that stops at the
        # first one found: a hash anti-join would read the whole runs table for a few versions.
        conn.execute("SET LOCAL enable_hashjoin = off")
        conn.execute("SET LOCAL enable_mergejoin = off")
        versions = conn.execute(
            """
            DELETE FROM workflow_versions v USING workflows w
            WHERE w.id = v.workflow_id AND w.deleted_at IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.workflow_id = v.workflow_id
                              AND r.workflow_version = v.version)
            """
        ).rowcount
        conn.execute(
            """
            DELETE FROM workflows w
            WHERE w.deleted_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.workflow_id = w.id)
            """
        )
    return versions


def fold_finished(pool: Pool) -> None:
    """Fold the finished runs' events into the queue stats' counts (the stats fold them too, but
    they may go unread for a long time)."""
    with pool.connection() as conn:
        fold_finish_events(conn)


@dataclass
class Job:
    name: str
    interval: float
    action: Callable[[], object]
    next_at: float = 0.0  # monotonic; 0 runs it as soon as this replica leads


def maintenance_jobs(settings: Settings, pool: Pool, broker: dramatiq.Broker) -> list[Job]:
    jobs = [
        Job("recover", settings.reconcile_seconds, Recovery(pool, broker, settings.lease_seconds)),
        Job("reconcile", settings.reconcile_seconds, lambda: reconcile(pool, broker, settings)),
        Job("fold", settings.reconcile_seconds, lambda: fold_finished(pool)),
        Job("prune", PRUNE_INTERVAL_SECONDS, lambda: prune_history(pool, settings.run_retention_days)),
    ]
    if settings.alert_webhook_url:
        alerts = AlertJob(AlertStore(pool), settings.alert_webhook_url, external_url=settings.public_url or "")
        jobs.append(Job("alerts", settings.alert_interval_seconds, alerts))
    return jobs


def maintenance_loop(lease: Lease, jobs: list[Job], stopping: threading.Event) -> None:
    """Run each job once per interval slot while this replica leads; errors wait for the next slot."""
    while not stopping.is_set():
        now = time.monotonic()
        for job in jobs:
            if now < job.next_at or not lease.is_leader():
                continue
            job.next_at = now + job.interval
            slot = int(time.time() // job.interval)
            try:
                if lease.claim_job(job.name, slot, job.interval * 2):
                    job.action()
            except Exception:
                log.warning("maintenance job %s failed; will retry next interval", job.name, exc_info=True)
        pending = [job.next_at for job in jobs]
        stopping.wait(max(0.05, min(min(pending) - time.monotonic(), 1.0)))
