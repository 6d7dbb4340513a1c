"""Claims and executes runs: the body of the ``execute_run`` actor, orchestrating claim → execute → finish.

A wake-up first takes a slot of the global rate limit (when none is free, the wake-up is re-sent
for the moment one frees up: no attempt used, no busy loop; when there turns out to be nothing to
claim, the slot is given back at once), then claims the best runnable run (``runstate.CLAIM``:
dispatch order, users at their concurrency cap skipped). A finished run is never claimed again,
so redelivered messages are harmless. A claim that finds nothing only because other claims hold
every runnable run (they may yet find its owner at the cap and leave it queued) gives the slot
back and sends the wake-up again a moment later (:data:`BUSY_RETRY_MS`), instead of leaving the
run to the reconciler. The statements that move the run are all in
:mod:`sluice_common.runstate`; the pieces the executor works with are in their own modules:
:mod:`~sluice_worker.claims` (the claimed run), :mod:`~sluice_worker.checkpoints` (step
checkpoints), :mod:`~sluice_worker.subruns` (sub-workflow runs) and
:mod:`~sluice_worker.outcomes` (which finishing statement an outcome takes).

Observers (the log context, metrics; see :mod:`sluice_common.observe`) hear of each claim, step
start and end, execution end and held-back wake-up through ``events``; :mod:`~sluice_worker.observing`
adapts the store.

Round trips to PostgreSQL per one-step run: one claim statement (run, attempt row and the pinned
workflow version, committed without waiting for the WAL flush) and one finishing statement (which
also writes the last step's checkpoint); one more per earlier step, one more to read the
checkpoints of a resumed run, and one more for a sub-workflow run that wakes its parent. Under
load the finishing statements of runs that end together go as one, with one commit
(``runstate.FINISH_ENDED_MANY``; see :mod:`sluice_common.groupcommit`). Claims
serialise per user, not globally, and for a cap above ``runstate.SHARED_CLAIM_RUNS`` times
max_connections only while the user is near it (see ``runstate.CLAIM_FUNCTION``).

Parking (a ``delay`` step, a ``workflow`` step waiting for its child) ends the attempt as
``parked`` and gives the attempt number back: the run goes to ``delayed`` (with its resume time
and a delayed wake-up) or to ``waiting`` (``waiting_for`` names the child run). A child's end
puts its waiting parent back to ``queued``; the housekeeping sweep (:meth:`RunExecutor.wake_waiting`)
catches any wake-up missed in a race or by a child that was cancelled or recovered elsewhere.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import dramatiq
import httpx
import psycopg

from sluice_common import runstate
from sluice_common.broker import send_run_message, wake
from sluice_common.db import Pool
from sluice_common.groupcommit import GroupCommit
from sluice_common.observe import RunEnded, RunEvents, RunStarted, run_events
from sluice_common.ratelimit import RateLimiter
from sluice_common.runs import MAX_DELAY_MS
from sluice_common.secrets import load_secrets
from sluice_common.settings import Settings
from sluice_worker.checkpoints import PgStepStore
from sluice_worker.claims import Claimed
from sluice_worker.engine import Outcome, RunContext, Runtime, StepStore, execute
from sluice_worker.observing import ObservedSteps, ended_as
from sluice_worker.outcomes import Finish, finish_for
from sluice_worker.safehttp import HttpPolicy
from sluice_worker.subruns import PgSubRuns

log = logging.getLogger(__name__)

# How long a thread goes on starting runs for waiting wake-ups before it returns to the broker.
CHAIN_SECONDS = 30.0
# How long a wake-up whose claim found every runnable run locked by other claims waits before it is
# tried again: long enough for those claims to commit, so that a busy database is not asked in a
# loop; the delay queue's consumer releases it within its own short poll after that.
BUSY_RETRY_MS = 20


class RunExecutor:
    def __init__(
        self,
        settings: Settings,
        pool: Pool,
        broker: dramatiq.Broker,
        limiter: RateLimiter,
        http: httpx.Client,
        worker_id: str,
        stopping: threading.Event,
        events: RunEvents | None = None,
    ) -> None:
        self.settings = settings
        self.events = run_events if events is None else events
        self.pool = pool
        self.broker = broker
        self.limiter = limiter
        self.http = http
        self.worker_id = worker_id
        self.stopping = stopping
        self.wakeups = 0  # messages handled, for metrics and to prove waits do not spin
        self.chained = 0  # runs started with a wake-up taken straight off the queue
        self.kept = 0  # wake-ups sent again because other claims held every runnable run
        self.policy = HttpPolicy(settings.http_allow_private, settings.http_allowed_hosts)
        self._in_flight: dict[str, str] = {}  # run id -> claim id
        self._in_flight_lock = threading.Lock()
        # Claims and ends of runs that this process's threads ask for at the same time go to
        # PostgreSQL together (see sluice_common.groupcommit); two wake-ups of a light moment
        # (two runs accepted at once) are claimed and finished side by side, as two worker
        # processes would.
        self._claims: GroupCommit[None, dict[str, Any] | None] = GroupCommit(self._claim_alone, self._claim_many)
        self._finishes = GroupCommit(self._finish_alone, self._finish_many)

    # The actor body --------------------------------------------------------------------------

    def handle(self, hint_run_id: str) -> None:
        """Handle one wake-up (``hint_run_id`` names the run it was sent for; any may start).

        After its run, the thread goes on with the next one while wake-ups wait in the queue,
        taking one off the queue per run (see :meth:`RateLimiter.acquire_waiting`): under a
        backlog a run then costs no broker round trip of its own (fetch, hand-over between
        threads, middleware, acknowledgement). Each run is still claimed as the best runnable one
        at that moment, so priority, delays and per-user caps hold as for any other wake-up. (A
        run's trace context is therefore its row's ``traceparent``, not the message's.)
        """
        self.wakeups += 1
        if self.stopping.is_set():
            send_run_message(self.broker, hint_run_id)  # hand the wake-up to another process
            return
        wait = self.limiter.acquire()
        if wait > 0:
            send_run_message(self.broker, hint_run_id, delay_ms=wait)  # no attempt used, no spinning
            self.events.rate_limited(wait)
            return
        # Bounded so that one message never holds its thread for long past a backlog's end.
        until = time.monotonic() + CHAIN_SECONDS
        while self._claim_and_run(hint_run_id) and not self.stopping.is_set() and time.monotonic() < until:
            try:
                if not self.limiter.acquire_waiting():
                    return
            except Exception:
                # Redis is unreachable: this message's work is done, and the wake-ups still in
                # the queue go through the broker once it is back.
                log.warning("could not look for waiting wake-ups", exc_info=True)
                return
            self.chained += 1

    def _claim_and_run(self, hint_run_id: str) -> bool:
        """Claim and run one run with the start slot (and wake-up) just taken; False when there was none."""
        try:
            claimed = self.claim()
        except psycopg.errors.LockNotAvailable:
            # Other claims held every runnable run (see runstate.CLAIM_FUNCTION): they may yet find
            # its owner at the cap and leave it queued, so this wake-up (or the one taken off the
            # queue, which any run id stands for) is kept for another look.
            self.limiter.release()
            send_run_message(self.broker, hint_run_id, delay_ms=BUSY_RETRY_MS)
            self.kept += 1
            return False
        except BaseException:
            self.limiter.release()
            raise
        if claimed is None:
            self.limiter.release()  # the slot was not used
            # Nothing runnable, or only runs of users at their cap: the end of one of their runs
            # sends the next wake-up (see runstate.FINISH_ENDED), so this one can go.
            return False
        self._track(claimed, add=True)
        started = time.monotonic()
        ended = "crashed"
        try:
            self.events.started(
                RunStarted(
                    claimed.run_id,
                    claimed.workflow_id,
                    claimed.trigger_type,
                    claimed.attempt,
                    self._queue_wait(claimed),
                    claimed.traceparent,
                )
            )
            outcome = self.run(claimed)
            ended = self.finish(claimed, outcome)
        finally:
            # Told even when the execution broke off: observers close what run_started opened.
            self.events.ended(
                RunEnded(
                    claimed.run_id,
                    claimed.workflow_id,
                    claimed.trigger_type,
                    claimed.attempt,
                    ended,
                    time.monotonic() - started,
                )
            )
            # Untracked, its lease lapses if finish() could not record the end: recovery takes over.
            self._track(claimed, add=False)
        return True

    def _queue_wait(self, claimed: Claimed) -> float | None:
        """Seconds from the run becoming ready to its claim: ``dispatch_at`` is the ready time plus aging."""
        if claimed.dispatch_lag is None:
            return None
        return claimed.dispatch_lag + (claimed.priority - 1) * self.settings.priority_aging_seconds

    def _track(self, claimed: Claimed, *, add: bool) -> None:
        with self._in_flight_lock:
            if add:
                self._in_flight[claimed.run_id] = claimed.claim_id
            elif self._in_flight.get(claimed.run_id) == claimed.claim_id:
                # Only its own claim: a stale execution of the run that ends while this process runs
                # a newer claim of it must not stop that claim's lease renewals.
                del self._in_flight[claimed.run_id]

    def claim(self) -> Claimed | None:
        """Claim the best runnable run: one statement, one round trip (``runstate.CLAIM``), shared
        with the claims of this process's other threads that ask meanwhile (:attr:`_claims`).

        None when there is nothing this worker may start; raises
        :class:`psycopg.errors.LockNotAvailable` when other claims held every run it could have taken.
        """
        row = self._claims(None)
        if row is None:
            return None
        if row["resumed"]:
            with self.pool.connection() as conn:
                checkpoints = conn.execute(runstate.CLAIM_CHECKPOINTS, {"run": row["id"]}).fetchone()
            row = {**row, **(checkpoints or {})}
        return Claimed.from_row(row)

    def _claim_params(self, count: int, *, exclusive: bool = False) -> dict[str, Any]:
        return {
            "user_cap": self.settings.user_concurrency,
            "worker": self.worker_id,
            "lease": self.settings.lease_seconds,
            "exclusive": exclusive,
            "count": count,
        }

    def _claim_alone(self, _: None) -> dict[str, Any] | None:
        with self.pool.connection() as conn:
            try:
                row = conn.execute(runstate.CLAIM, self._claim_params(1)).fetchone()
            except psycopg.errors.SerializationFailure:
                # The owner is close to the cap, where a claim counts under the owner's exclusive lock.
                row = conn.execute(runstate.CLAIM, self._claim_params(1, exclusive=True)).fetchone()
        return dict(row) if row is not None else None

    def _claim_many(self, asked: Sequence[None]) -> list[dict[str, Any] | None]:
        """Up to ``len(asked)`` runs in one claim; the threads left without one claim alone (which
        finds the run that was locked a moment ago, says busy, or finds nothing)."""
        with self.pool.connection() as conn:
            rows: list[dict[str, Any] | None] = [
                dict(row) for row in conn.execute(runstate.CLAIM, self._claim_params(len(asked))).fetchall()
            ]
        return rows + [None] * (len(asked) - len(rows))

    # Running ------------------------------------------------------------------------------------

    def run(self, claimed: Claimed) -> Outcome:
        if claimed.steps is None:
            return Outcome("cancelled", "the workflow was deleted")
        timeout = claimed.settings.get("timeoutSeconds") or self.settings.run_timeout_seconds
        ctx = RunContext(
            run_id=claimed.run_id,
            workflow_id=claimed.workflow_id,
            attempt=claimed.attempt,
            trigger_type=claimed.trigger_type,
            trigger_data=claimed.trigger_data,
            steps=claimed.steps,
            deadline=time.monotonic() + float(timeout),
            variables=claimed.settings.get("variables") or {},
            owner_id=claimed.owner_id,
            secrets=lambda: load_secrets(self.pool, self.settings, claimed.owner_id),
        )
        store = PgStepStore(self.pool, claimed, self.stopping)
        steps: StepStore = ObservedSteps(store, claimed, self.events) if self.events.observers else store
        runtime = Runtime(
            self.http,
            http_policy=self.policy,
            step_timeout=self.settings.step_timeout_seconds,
            output_max_bytes=self.settings.step_output_max_bytes,
            subruns=PgSubRuns(self.settings, self.pool, self.broker, claimed),
        )
        try:
            outcome = execute(ctx, steps, runtime)
        except Exception as exc:  # storage trouble mid-run: a failed attempt, retried as usual
            log.exception("run %s attempt %d crashed", claimed.run_id, claimed.attempt)
            outcome = Outcome("failed", f"{type(exc).__name__}: {exc}")
        return dataclasses.replace(outcome, final_step=store.final_step)

    def finish(self, claimed: Claimed, outcome: Outcome) -> str:
        """Record the attempt's end and move the run on: done, retried later, parked or handed back.

        Returns how the execution ended (see :func:`~sluice_worker.observing.ended_as`).
        """
        finish = self.finish_for(claimed, outcome)
        updated = self._finish_with_retries(finish)
        ended = ended_as(finish, updated)
        if updated is None:
            # The claim was lost (a lapsed lease, a claim lost in a database crash) and another
            # execution holds the run or has finished it: its result stands, this one is recorded.
            log.warning("run %s was taken over while attempt %d ran", claimed.run_id, claimed.attempt)
            self._record_lost(claimed)
            return ended
        if updated["status"] == runstate.RunStatus.QUEUED:
            wake(self.broker, claimed.run_id)
        elif updated["status"] == runstate.RunStatus.DELAYED:
            # Past Dramatiq's delay limit, the reconciler wakes the run once it is due.
            wake(self.broker, claimed.run_id, delay_ms=min(finish.params["wait"], MAX_DELAY_MS))
        elif updated["status"] in runstate.TERMINAL and claimed.parent_run_id is not None:
            self._wake_parent(claimed)
        if updated["wake_next"]:
            wake(self.broker, claimed.run_id)
        return ended

    def _record_lost(self, claimed: Claimed) -> None:
        params = {
            "id": claimed.run_id,
            "attempt": claimed.attempt,
            "worker": self.worker_id,
            "claim": claimed.claim_id,
            "started": claimed.claimed_at,
        }
        try:
            with self.pool.connection() as conn:
                conn.execute(runstate.RECORD_LOST, params)
        except psycopg.OperationalError:
            log.warning("could not record the lost execution of run %s", claimed.run_id, exc_info=True)

    def finish_for(self, claimed: Claimed, outcome: Outcome) -> Finish:
        """The finishing statement and its parameters for this attempt's outcome."""
        return finish_for(self.settings, self.worker_id, claimed, outcome)

    def _finish_with_retries(self, finish: Finish) -> dict[str, Any] | None:
        """Run the finishing statement, riding out a short database outage (the lease keeps the run ours).

        An attempt that ends its run goes through the group commit (:attr:`_finishes`): the
        attempts of this process's threads that end while one is being recorded are recorded
        together.
        """
        write = self._finishes if finish.statement is runstate.FINISH_ENDED else self._finish_alone
        delay = 0.2
        for attempt in range(6):
            try:
                return write(finish)
            except psycopg.OperationalError:
                if attempt == 5:
                    raise
                log.warning("could not record the end of run %s; retrying", finish.params["id"], exc_info=True)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        return None

    def _finish_alone(self, finish: Finish) -> dict[str, Any] | None:
        with self.pool.connection() as conn:
            row = conn.execute(finish.statement, finish.params).fetchone()
        return dict(row) if row is not None else None

    def _finish_many(self, finishes: Sequence[Finish]) -> list[dict[str, Any] | None]:
        """FINISH_ENDED_MANY; None for an attempt whose claim is gone, which is then finished alone
        (and found gone again: the lost path costs a statement more, the common one a commit less)."""
        params: dict[str, Any] = {
            name: [f.params[name] for f in finishes] for name in runstate.FINISH_ENDED_MANY_ARRAYS
        }
        params["user_cap"] = finishes[0].params["user_cap"]
        params["worker"] = self.worker_id
        with self.pool.connection() as conn:
            rows = conn.execute(runstate.FINISH_ENDED_MANY, params).fetchall()
        ended = {(str(row["id"]), str(row["claim"])): dict(row) for row in rows}
        return [ended.get((str(f.params["id"]), str(f.params["claim"]))) for f in finishes]

    def _wake_parent(self, claimed: Claimed) -> None:
        """A sub-workflow run ended: its parent goes back to the queue (the sweep covers a failure here)."""
        try:
            with self.pool.connection() as conn:
                row = conn.execute(
                    runstate.WAKE_PARENT,
                    {
                        "parent": claimed.parent_run_id,
                        "child": claimed.run_id,
                        "aging_step": self.settings.priority_aging_seconds,
                    },
                ).fetchone()
        except psycopg.OperationalError:
            log.warning("could not wake the parent of run %s; the sweep will", claimed.run_id, exc_info=True)
            return
        if row is not None:
            wake(self.broker, str(row["id"]))

    def wake_waiting(self) -> int:
        """Queue runs waiting for a child run that has ended (or vanished); return how many.

        The child's finishing statement normally does this at once; this sweep covers a child
        cancelled before it started, a child recovered after its worker died, and the narrow
        race of a child ending while its parent was parking.
        """
        with self.pool.connection() as conn:
            rows = conn.execute(runstate.WAKE_WAITING, {"aging_step": self.settings.priority_aging_seconds}).fetchall()
        for row in rows:
            wake(self.broker, str(row["id"]))
        return len(rows)

    # Leases ---------------------------------------------------------------------------------------

    def in_flight(self) -> list[str]:
        """The runs this process is executing right now."""
        with self._in_flight_lock:
            return list(self._in_flight)

    def renew_leases(self) -> int:
        """Extend the leases of the runs this process is executing right now (and only those)."""
        with self._in_flight_lock:
            held = dict(self._in_flight)
        if not held:
            return 0
        with self.pool.connection() as conn:
            return conn.execute(
                runstate.RENEW_LEASES,
                {"lease": self.settings.lease_seconds, "ids": list(held), "claims": list(held.values())},
                prepare=False,  # runstate.UNPREPARED
            ).rowcount
