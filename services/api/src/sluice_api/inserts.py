"""Group commit of new runs: the run rows that a process's request threads ask for while one insert
is in flight go in together, as one statement and one commit.

Every accepted run is committed before its request is answered, so each request thread used to
wait for an insert of its own: a statement, a transaction and a WAL flush per run, which is most
of what an insert costs PostgreSQL. Here one thread at a time (the leader) inserts; the threads
that arrive meanwhile queue their runs, and when the insert returns, the first of them leads the
next one with all of them (``runstate.INSERT_RUNS``). Nothing waits for company: a thread that
finds no insert in flight goes at once, so a lone request costs what it did (``INSERT_RUN``), and
the batches grow only with the load. Under the end-to-end benchmark's load (docs/scaling.md)
PostgreSQL spends about a third of a lone insert per run of a batch of two, and a half less
again per run of a batch of four.

A run the batch leaves out (a missing or paused workflow, a rotated webhook secret, an
idempotency hit) is inserted again by its own thread, alone, which says why. So is every run of a
batch whose statement failed: one bad request cannot fail the others.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sluice_common.db import Pool
from sluice_common.runs import EnqueuedRun, NewRun, insert_alone, insert_many
from sluice_common.settings import Settings

# Runs per statement at most: a larger backlog of waiting threads goes in several.
MAX_BATCH = 64


@dataclass(eq=False)
class _Waiter:
    new: NewRun
    done: threading.Event = field(default_factory=threading.Event)
    batch: list[_Waiter] | None = None  # set when this thread is to lead the next insert
    run: EnqueuedRun | None = None  # inserted by the batch; None: insert it alone


class RunInserts:
    """Inserts new runs for the request threads of one process (callable, for ``enqueue_run``)."""

    def __init__(self, pool: Pool, settings: Settings, *, max_batch: int = MAX_BATCH) -> None:
        self._pool = pool
        self._settings = settings
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queued: list[_Waiter] = []
        self._busy = False  # an insert is in flight
        self.batches = 0  # statements of more than one run, and the runs in them (for tests and benchmarks)
        self.batched = 0

    def __call__(self, new: NewRun) -> EnqueuedRun:
        me = _Waiter(new)
        with self._lock:
            lead = not self._busy
            if lead:
                self._busy = True
                me.batch = [me]
            else:
                self._queued.append(me)
        if not lead:
            me.done.wait()
        if me.batch is not None:
            self._lead(me.batch)
        return me.run if me.run is not None else insert_alone(self._pool, self._settings, new)

    def _lead(self, batch: list[_Waiter]) -> None:
        try:
            if len(batch) == 1:
                batch[0].run = insert_alone(self._pool, self._settings, batch[0].new)
            else:
                self._insert(batch)
        except Exception:
            if len(batch) == 1:
                raise  # the leader's own insert: its request fails, as it would alone
            # The others retry alone (below), each with its own outcome.
        finally:
            self._hand_over()
            for waiter in batch[1:]:
                waiter.done.set()

    def _insert(self, batch: list[_Waiter]) -> None:
        with self._pool.connection() as conn:
            runs = insert_many(conn, self._settings, [w.new for w in batch])
        for waiter, run in zip(batch, runs, strict=True):
            waiter.run = run
        self.batches += 1
        self.batched += len(batch)

    def _hand_over(self) -> None:
        """Make the first queued thread the next leader, with the runs queued so far, or go idle."""
        with self._lock:
            if not self._queued:
                self._busy = False
                return
            batch, self._queued = self._queued[: self._max_batch], self._queued[self._max_batch :]
        batch[0].batch = batch
        batch[0].done.set()
