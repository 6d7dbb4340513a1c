"""The alert rules the scheduler's leader evaluates for ``SLUICE_ALERT_WEBHOOK_URL``: one home for each.

They are the rules of ``deploy/prometheus/alerts.yaml`` that PostgreSQL can answer, with the same
names, thresholds and ``for`` durations, each measured by one query here. Two rules stay with
Prometheus alone: ``SluiceNoSchedulerLeader`` (a leader cannot report that there is none) and
``SluiceQueueStatsDown`` (the API failing to read PostgreSQL; when the leader cannot, it cannot
evaluate or record anything either).

A rule is active while its measure is above its threshold; a measure of ``None`` (no data, such as
too few runs to speak of a rate) is inactive, as an empty result is for Prometheus.
:mod:`sluice_scheduler.alerting` runs them, keeps their states and posts their changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sluice_common.db import DictConnection
from sluice_common.metrics import EXPIRED_LEASES_SQL
from sluice_common.runs import READY_TO_START

# The failure rate's window (as the Prometheus rule's rate over 10 minutes), and the fewest ended
# runs in it that make a rate: 1 failure out of 3 runs is not worth a page.
FAILURE_WINDOW_SECONDS = 600
FAILURE_MIN_RUNS = 10
# A worker finishing a run this recently is alive, even if no run is running at the moment.
WORKER_ACTIVITY_SECONDS = 60


@dataclass(frozen=True)
class AlertRule:
    name: str
    severity: str
    summary: str  # str.format templates of the measured ``value``
    description: str
    threshold: float  # active while the measure is above it
    for_seconds: float  # active this long before it fires
    measure: Callable[[DictConnection], float | None]

    def active(self, value: float | None) -> bool:
        return value is not None and value > self.threshold

    def annotations(self, value: float | None) -> dict[str, str]:
        shown = 0.0 if value is None else value
        return {"summary": self.summary.format(value=shown), "description": self.description.format(value=shown)}


def _count(conn: DictConnection, query: str) -> float:
    row = conn.execute(query).fetchone()
    return float(row["n"]) if row is not None else 0.0


def waiting_runs(conn: DictConnection) -> float | None:
    """Runs ready to start and waiting for a worker: the stats endpoint's (and the gauge's) ``waiting``."""
    return _count(conn, f"SELECT count(*) AS n FROM runs WHERE {READY_TO_START}")


def failure_rate(conn: DictConnection) -> float | None:
    """Of the runs that ended in the window (succeeded or failed for good), the share that failed."""
    row = conn.execute(
        """
        SELECT count(*) FILTER (WHERE status = 'failed') AS failed, count(*) AS ended
        FROM runs WHERE status IN ('succeeded', 'failed') AND finished_at > now() - make_interval(secs => %s)
        """,
        (FAILURE_WINDOW_SECONDS,),
    ).fetchone()
    if row is None or row["ended"] < FAILURE_MIN_RUNS:
        return None
    return float(row["failed"]) / float(row["ended"])


def waiting_without_workers(conn: DictConnection) -> float | None:
    """Runs waiting while no worker shows a sign of life; 0 when one does.

    Workers are not registered in PostgreSQL, but a live one renews the lease of every run it
    holds, and an idle one claims a waiting run within moments. So: no running run with a live
    lease, and no run ended by a worker lately (short runs are over between two evaluations).
    Held for the rule's ``for``, that is no claim at all in that time while runs were ready.
    """
    return _count(
        conn,
        f"""
        SELECT CASE WHEN EXISTS (SELECT 1 FROM runs WHERE status = 'running' AND lease_expires_at > now())
                      OR EXISTS (SELECT 1 FROM runs WHERE status IN ('succeeded', 'failed')
                                   AND finished_at > now() - make_interval(secs => {WORKER_ACTIVITY_SECONDS}))
                    THEN 0
                    ELSE (SELECT count(*) FROM runs WHERE {READY_TO_START}) END AS n
        """,
    )


def lease_expired_runs(conn: DictConnection) -> float | None:
    """Running runs whose worker's lease lapsed and that nothing recovered: the gauge's query."""
    return _count(conn, EXPIRED_LEASES_SQL)


RULES: tuple[AlertRule, ...] = (
    AlertRule(
        name="SluiceQueueBacklog",
        severity="warning",
        summary="{value:.0f} runs are waiting for a worker",
        description="More than 50 runs have been ready to start for 5 minutes; add workers or raise "
        "SLUICE_CONCURRENCY.",
        threshold=50,
        for_seconds=300,
        measure=waiting_runs,
    ),
    AlertRule(
        name="SluiceHighFailureRate",
        severity="warning",
        summary="{value:.0%} of runs are failing",
        description=f"More than 10% of the runs that ended in the last 10 minutes failed after their last "
        f"attempt (counted from {FAILURE_MIN_RUNS} ended runs on).",
        threshold=0.1,
        for_seconds=300,
        measure=failure_rate,
    ),
    AlertRule(
        name="SluiceNoWorkersWhileRunsWait",
        severity="critical",
        summary="Runs are waiting and no worker is up",
        description="{value:.0f} runs are ready to start and no worker has held or finished a run for 2 minutes.",
        threshold=0,
        for_seconds=120,
        measure=waiting_without_workers,
    ),
    AlertRule(
        name="SluiceRunsStuckPastLease",
        severity="critical",
        summary="{value:.0f} runs are stuck past their lease",
        description="Running runs whose worker's lease lapsed 5 minutes ago are not being recovered (no worker "
        "or scheduler doing housekeeping?).",
        threshold=0,
        for_seconds=300,
        measure=lease_expired_runs,
    ),
)
