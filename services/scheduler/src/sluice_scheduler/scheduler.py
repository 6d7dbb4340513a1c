"""The cron scheduler: loads active cron workflows, keeps a heap of next fire times, fires them.

Three threads: the cron loop (sleeps in :meth:`Signals.wait` until the earliest fire is due or a
trigger change arrives), the lease (acquire, renew, publish the status) and maintenance (leader
only), plus a few fire threads for workflows due at the same moment.

A replica that becomes leader loads every active cron workflow and resumes each one from its
*anchor*: its latest claimed slot in ``cron_fires``, or the time its row last changed (creation,
edit, resume), whichever is later. Slots since the anchor are planned by
:func:`~sluice_common.cron.plan_due`: those at most ``SLUICE_CRON_LATE_TOLERANCE_SECONDS`` old
fire as usual (a handover gap is fired, not lost), older ones follow the workflow's missed policy.
A replica that stops leading forgets its schedules; the new leader starts again from the database.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
from pydantic import ValidationError

from sluice_common import tracing
from sluice_common.cron import REFRESH_ALL, Schedule, plan_due
from sluice_common.db import Pool
from sluice_common.logs import log_context
from sluice_common.settings import Settings
from sluice_common.workflow import CronConfig
from sluice_scheduler.firing import CronWorkflow, fire, release_deferred
from sluice_scheduler.hooks import SchedulerEvents
from sluice_scheduler.leadership import Lease
from sluice_scheduler.maintenance import Job, maintenance_jobs, maintenance_loop
from sluice_scheduler.signals import LocalSignals, Signals

log = logging.getLogger(__name__)

# The leader reloads everything this often anyway: a change notice lost with a dropped Redis
# connection delays that change by at most this long.
RESYNC_SECONDS = 30.0
# Deferred fires (overlap ``queue_one``) are checked this often while any exist.
DEFERRED_POLL_SECONDS = 0.25
# An idle loop still wakes this often, to notice it became (or stopped being) the leader.
IDLE_WAIT_SECONDS = 0.5
RETRY_SECONDS = 1.0
FIRE_THREADS = 4

_LOAD_SQL = """
SELECT w.id, w.owner_id, w.trigger, w.updated_at,
       (SELECT max(f.scheduled_at) FROM cron_fires f WHERE f.workflow_id = w.id) AS last_fire
FROM workflows w
WHERE w.trigger_type = 'cron' AND w.status = 'active' AND w.deleted_at IS NULL
"""


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Entry:
    workflow: CronWorkflow
    schedule: Schedule
    anchor: datetime  # slots after this one are still to be handled
    next_at: datetime | None
    generation: int = 0

    @property
    def timing(self) -> tuple[str, str]:
        return self.workflow.config.schedule, self.workflow.config.timezone


class CronScheduler:
    def __init__(
        self,
        settings: Settings,
        pool: Pool,
        broker: dramatiq.Broker,
        lease: Lease,
        signals: Signals,
        *,
        jobs: list[Job] | None = None,
        events: SchedulerEvents | None = None,
    ) -> None:
        self.settings = settings
        self.events = events or SchedulerEvents()
        self.pool = pool
        self.broker = broker
        self.lease = lease
        self.signals = signals
        self.jobs = maintenance_jobs(settings, pool, broker) if jobs is None else jobs
        self.entries: dict[str, Entry] = {}
        self.heap: list[tuple[datetime, str, int]] = []
        self.loaded = False
        self._has_deferred = False
        self._next_deferred_check = 0.0
        self._next_resync = 0.0
        self._leading = False
        self._reanchor = False
        self._logged_count = -1
        self._threads: list[threading.Thread] = []
        # Fires of different workflows due at the same moment go out in parallel (each on its
        # own connection); one workflow's slots are always handled in order by one task.
        self._executor = ThreadPoolExecutor(max_workers=FIRE_THREADS, thread_name_prefix="sluice-fire")

    # status ------------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        return {"initialized": self.loaded and self.lease.is_leader(), "scheduledWorkflows": len(self.entries)}

    # loading -----------------------------------------------------------------------------------

    def _push(self, entry: Entry) -> None:
        entry.generation += 1
        if entry.next_at is not None:
            heapq.heappush(self.heap, (entry.next_at, entry.workflow.id, entry.generation))

    def _entry_from_row(self, row: dict[str, Any]) -> Entry | None:
        wf_id = str(row["id"])
        trigger = row["trigger"] or {}
        old = self.entries.get(wf_id)
        if old is not None and old.workflow.trigger == trigger and old.workflow.owner_id == str(row["owner_id"]):
            # Unchanged (the periodic reload, or an edit of something else): keep the entry, only
            # catching up with a slot another leader may have claimed meanwhile.
            if row["last_fire"] is not None and row["last_fire"] > old.anchor:
                old.anchor = row["last_fire"]
                old.next_at = old.schedule.next_after(old.anchor)
            return old
        try:
            config = CronConfig.model_validate(trigger.get("config", {}))
            schedule = Schedule.of(config)
        except (ValidationError, ValueError):
            log.warning("workflow %s has an invalid cron trigger; not scheduled", wf_id, exc_info=True)
            return None
        workflow = CronWorkflow(wf_id, str(row["owner_id"]), trigger, config)
        anchor = max(a for a in (row["updated_at"], row["last_fire"]) if a is not None)
        if old is not None and old.timing == (config.schedule, config.timezone):
            # Same schedule (a rename, a policy change): keep going from where it was.
            anchor = max(old.anchor, row["last_fire"] or old.anchor)
        entry = Entry(workflow, schedule, anchor, schedule.next_after(anchor))
        if old is not None:
            entry.generation = old.generation
        return entry

    def reload(self, workflow_id: str | None = None) -> None:
        """Reload one workflow's trigger, or all of them (``None``), from PostgreSQL."""
        with self.pool.connection() as conn:
            if workflow_id is None:
                rows = conn.execute(_LOAD_SQL).fetchall()
            else:
                try:
                    workflow_id = str(uuid.UUID(workflow_id))
                except ValueError:
                    log.warning("ignoring a change notice for %r (not a workflow id)", workflow_id)
                    return
                rows = conn.execute(_LOAD_SQL + " AND w.id = %s", (workflow_id,)).fetchall()
            deferred = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM cron_fires WHERE outcome = 'deferred') AS d"
            ).fetchone()
        self._has_deferred = bool(deferred and deferred["d"])
        seen = set()
        for row in rows:
            entry = self._entry_from_row(dict(row))
            if entry is None:
                continue
            seen.add(entry.workflow.id)
            self.entries[entry.workflow.id] = entry
            self._push(entry)
        gone = set(self.entries) - seen if workflow_id is None else ({workflow_id} - seen)
        for wf_id in gone:
            if self.entries.pop(wf_id, None) is not None:
                log.info("workflow %s is no longer scheduled", wf_id)
        if workflow_id is None:
            # Rebuilt rather than pushed onto, so the heap holds one item per workflow after each
            # periodic reload instead of growing with stale ones.
            self.heap = [(e.next_at, k, e.generation) for k, e in self.entries.items() if e.next_at is not None]
            heapq.heapify(self.heap)
            level = logging.DEBUG if self.loaded and len(self.entries) == self._logged_count else logging.INFO
            log.log(level, "scheduling %d cron workflow(s)", len(self.entries))
            self._logged_count = len(self.entries)
            self.loaded = True
            self._next_resync = time.monotonic() + RESYNC_SECONDS
        self.publish_status()

    def publish_status(self) -> None:
        """Refresh the status the API reads (also done by the lease thread every few seconds)."""
        if not (self.loaded and self.lease.is_leader()):
            return
        try:
            self.lease.publish_status({"initialized": True, "scheduledWorkflows": len(self.entries)})
        except Exception:
            log.warning("cannot publish the scheduler status", exc_info=True)

    def _forget(self) -> None:
        self.entries.clear()
        self.heap.clear()
        self.loaded = False

    # firing ------------------------------------------------------------------------------------

    def _due(self, now: datetime) -> Entry | None:
        while self.heap and self.heap[0][0] <= now:
            _, wf_id, generation = heapq.heappop(self.heap)
            entry = self.entries.get(wf_id)
            if entry is not None and entry.generation == generation:
                return entry
        return None

    def fire_due(self) -> None:
        """Fire every entry that is due, several at once: slots cluster on round minutes."""
        now = _utcnow()
        due: list[Entry] = []
        while self.lease.is_leader() and (entry := self._due(now)) is not None:
            due.append(entry)
        if len(due) == 1:
            results = [self._fire_entry(due[0], now)]
        else:
            results = list(self._executor.map(lambda e: self._fire_entry(e, now), due))
        if "retry" in results:
            # The database failed under us: once it answers again, take every anchor from it
            # afresh, so a fire whose commit was lost in a crash is fired again (if still recent).
            self._reanchor = True
            self._drop_broken_connections()
        for entry, result in zip(due, results, strict=True):
            if result == "stale":
                # Paused, deleted or changed since it was loaded: reload it, then plan again.
                self.reload(entry.workflow.id)
                fresh = self.entries.get(entry.workflow.id)
                if fresh is not None:
                    fresh.next_at = _utcnow()  # this turn's ``now`` is past, so no hot loop
                    self._push(fresh)
            else:
                self._push(entry)

    def _fire_entry(self, entry: Entry, now: datetime) -> str:
        """Handle an entry's due slots in order; set its next time. Runs on the fire threads."""
        # Every line logged while the workflow's slots fire names it (and a slot's run, once created).
        with log_context(workflow_id=entry.workflow.id):
            return self._fire_slots(entry, now)

    def _fire_slots(self, entry: Entry, now: datetime) -> str:
        config = entry.workflow.config
        plan = plan_due(entry.schedule, config, entry.anchor, now, self.settings.cron_late_tolerance_seconds)
        if plan.missed:
            log.warning(
                "workflow %s missed %s%d slot(s) while no scheduler ran (policy %s)",
                entry.workflow.id,
                "" if plan.exact else "at least ",
                plan.missed,
                entry.workflow.config.missed,
            )
            self.events.slots_missed(entry.workflow.id, plan.missed)
        for planned in plan.fires:
            if not self.lease.is_leader():
                # The new leader resumes from the last claimed slot; if leadership comes back to
                # this replica instead, the entry is due again at once.
                entry.next_at = now
                return "lost"
            try:
                # A cron run's trace starts here: the run is created under this span.
                with tracing.span(
                    "cron fire",
                    {
                        "sluice.workflow.id": entry.workflow.id,
                        "sluice.cron.scheduled_at": planned.scheduled_at.isoformat(),
                    },
                ) as span:
                    outcome, run_id = fire(self.pool, self.broker, self.settings, entry.workflow, planned)
                    if span is not None:
                        span.set_attribute("sluice.cron.outcome", outcome)
            except Exception:
                log.warning("cannot fire workflow %s yet; retrying", entry.workflow.id, exc_info=True)
                entry.next_at = _utcnow() + timedelta(seconds=RETRY_SECONDS)
                return "retry"
            self.events.slot_handled(entry.workflow.id, outcome, (_utcnow() - planned.scheduled_at).total_seconds())
            if outcome == "stale":
                return "stale"
            entry.anchor = planned.scheduled_at
            if outcome == "deferred":
                self._has_deferred = True
            log.debug("workflow %s slot %s: %s (run %s)", entry.workflow.id, planned.scheduled_at, outcome, run_id)
        if plan.last_slot is not None and plan.last_slot > entry.anchor:
            entry.anchor = plan.last_slot
        entry.next_at = entry.schedule.next_after(max(entry.anchor, now))
        return "ok"

    def _drop_broken_connections(self) -> None:
        # After a database restart every idle connection in the pool is dead; without this each
        # would fail one attempt (and cost a retry interval) before the pool replaced it.
        try:
            self.pool.check()
        except Exception:
            log.debug("pool check failed", exc_info=True)

    def _release_deferred(self) -> None:
        if not self._has_deferred or time.monotonic() < self._next_deferred_check:
            return
        self._next_deferred_check = time.monotonic() + DEFERRED_POLL_SECONDS
        try:
            _, waiting = release_deferred(
                self.pool, self.broker, self.settings, {k: e.workflow for k, e in self.entries.items()}
            )
            self._has_deferred = waiting > 0
        except Exception:
            log.warning("cannot start deferred cron runs yet", exc_info=True)

    # the loop ----------------------------------------------------------------------------------

    def _wait_seconds(self) -> float:
        if not self._leading:
            return IDLE_WAIT_SECONDS
        limit = IDLE_WAIT_SECONDS
        if self._has_deferred:
            limit = DEFERRED_POLL_SECONDS
        if self.heap:
            limit = min(limit, (self.heap[0][0] - _utcnow()).total_seconds())
        return max(0.0, limit)

    def step(self) -> None:
        """One turn of the cron loop: follow leadership, fire what is due, wait for the next thing."""
        leading = self.lease.is_leader()
        try:
            if leading and self._reanchor:
                self._forget()
                self.reload()
                self._reanchor = False
            elif leading and (not self._leading or time.monotonic() >= self._next_resync):
                self.reload()
            elif not leading and self._leading:
                log.info("no longer the leader; schedules handed over")
                self._forget()
            if leading != self._leading:
                self.events.leadership(leading)
            self._leading = leading
            if leading:
                self.fire_due()
                self._release_deferred()
        except Exception:
            log.warning("cron loop error; retrying", exc_info=True)
            self._leading = False  # reload from scratch on the next turn
            self._forget()
            self._drop_broken_connections()
            time.sleep(RETRY_SECONDS)
        notices = self.signals.wait(self._wait_seconds())
        if notices and self._leading:
            try:
                if REFRESH_ALL in notices:
                    log.info("refresh requested: reloading every cron trigger")
                    self.reload()
                else:
                    for wf_id in dict.fromkeys(notices):
                        self.reload(wf_id)
            except Exception:
                log.warning("cannot apply trigger changes yet; full reload on the next turn", exc_info=True)
                self._next_resync = 0.0

    def cron_loop(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            self.step()

    def lease_loop(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            if self.lease.tick():
                self.publish_status()
            stopping.wait(self.lease.interval())

    def start(self, stopping: threading.Event) -> None:
        """Start the lease, maintenance and cron threads (standalone mode runs the scheduler so)."""
        self.lease.tick()
        # Subscribe to change notices before the first load, so no change falls in between.
        self.signals.wait(0)
        for name, target in (
            ("sluice-scheduler-lease", self.lease_loop),
            ("sluice-maintenance", lambda s: maintenance_loop(self.lease, self.jobs, s)),
            ("sluice-cron", self.cron_loop),
        ):
            thread = threading.Thread(target=target, args=(stopping,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self, timeout: float = 5.0) -> None:
        for thread in self._threads:
            thread.join(timeout=timeout)
        self._executor.shutdown(wait=True)
        self.lease.release()
        self.signals.close()


class LocalSchedulerLink:
    """:class:`~sluice_common.schedulerlink.SchedulerLink` to a scheduler in this process (standalone)."""

    def __init__(self, scheduler: CronScheduler, signals: LocalSignals) -> None:
        self._scheduler = scheduler
        self._signals = signals

    def trigger_changed(self, workflow_id: str) -> None:
        self._signals.put(str(workflow_id))

    def refresh(self) -> None:
        self._signals.put(REFRESH_ALL)

    def status(self) -> dict[str, object]:
        return self._scheduler.status()
