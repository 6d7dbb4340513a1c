"""Group commit: the writes that a process's threads ask for while one is in flight go in together,
as one statement and one commit.

A write that its caller waits for (a new run before its request is answered, a claim, a run's end
before its worker takes the next) costs PostgreSQL a statement and a transaction, and a durable
one a WAL flush too, which is most of what a small write costs. With a :class:`GroupCommit`, one thread at a
time (the leader) writes; threads that arrive meanwhile queue their items, and when the write
returns, the first of them leads the next one with all of them. Nothing waits for company: a
thread that finds no write in flight goes at once with the statement for one item, so a lone
caller costs what it did, and batches grow only with the load.

Requests that arrive together at light load (two webhooks sent at once) would still queue, one
behind the other's whole write, for a batch of one. So a second caller goes at once too, beside a
lone write, when that write began after the group had been idle for ``LIGHT_GAP_S``
(``lone_writes``, :data:`LONE_WRITES` by default). That is one such pair per light moment: after
it, callers queue and batch until the group has been idle again, and under steady load the group
is never idle that long.

An item the batch leaves out (``many`` returns None for it) is written again by its own thread
with ``one``, which then says why (raises, or returns what a write of that item alone returns).
So is every item of a batch whose statement PostgreSQL refused: one bad item cannot fail the
others. A batch whose outcome is unknown is not written again: when the connection failed before
PostgreSQL answered, the statement may have committed, and writing its items again would store
them twice (two runs for one request, runs claimed by no thread). Every caller of such a batch
gets the error, as it would have alone (:func:`outcome_unknown`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import psycopg

T = TypeVar("T")
R = TypeVar("R")

# Items per statement at most: a larger queue of waiting threads goes in several.
MAX_BATCH = 64
# A line of writes that begins after the group was idle this long is light load; up to this many
# lone writes of such a moment go side by side.
LIGHT_GAP_S = 0.01
LONE_WRITES = 2
_UNWRITTEN: Any = object()


def outcome_unknown(exc: Exception) -> bool:
    """Whether a write that raised ``exc`` may have been done all the same.

    PostgreSQL answers a statement it refused with an error that has a SQLSTATE, and rolls it back.
    An error without one (the connection broke, or no connection was had: a pool timeout) or of a
    connection exception (class 08) or an operator's intervention (class 57: a backend terminated,
    a server shutting down, which can end a session after its commit) leaves the outcome unknown.
    """
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    return state is None or state[:2] in ("08", "57")


class _Signal:
    """Wakes the one thread waiting for it, once: a lock taken at creation and released by ``set``.

    A ``threading.Event`` does the same through a ``Condition``: both sides run its Python code
    under its lock, each wait allocates a lock of its own, and the woken thread then waits again
    for the Condition's lock, which the setter still holds. Under load a run goes through up to
    three of these hand-overs (its insert, claim and finish), so their cost is paid per run.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        """Wake the waiter (or let its ``wait`` return at once); call it once."""
        self._lock.release()

    def wait(self) -> None:
        self._lock.acquire()


@dataclass(eq=False)
class _Waiter(Generic[T, R]):
    item: T
    done: _Signal = field(default_factory=_Signal)
    batch: list[_Waiter[T, R]] | None = None  # set when this thread is to lead the next write
    led: bool = False  # it has started to lead it
    result: R = _UNWRITTEN  # what its write returned; unwritten: its thread writes it alone
    error: Exception | None = None  # its batch's outcome is unknown: raised by its thread


class GroupCommit(Generic[T, R]):
    """Writes items for the threads of one process: ``one`` writes one item, ``many`` several in
    one statement (None for each item it left out). ``lone_writes``: how many lone writes of a
    light moment may be in flight side by side (see the module's docstring)."""

    def __init__(
        self,
        one: Callable[[T], R],
        many: Callable[[Sequence[T]], Sequence[R | None]],
        *,
        max_batch: int = MAX_BATCH,
        lone_writes: int | None = None,
    ) -> None:
        self._one = one
        self._many = many
        self._max_batch = max_batch
        self._lone_writes = LONE_WRITES if lone_writes is None else lone_writes
        self._lock = threading.Lock()
        self._queued: list[_Waiter[T, R]] = []
        self._writes = 0  # writes in flight
        self._items = 0  # items in them
        self._idle_since = float("-inf")  # monotonic time the last write in flight ended
        # The writes in flight began after an idle gap, and no more than one light moment's
        # writes have gone side by side since: a line that keeps busy is load, not a moment.
        self._light = False
        self.batches = 0  # statements of more than one item, and the items in them (read by the tests)
        self.batched = 0

    def __call__(self, item: T) -> R:
        me: _Waiter[T, R] = _Waiter(item)
        try:
            with self._lock:
                # An asynchronous exception is raised when a call returns (or a function begins):
                # the calls come before the changes, and _abandon undoes the changes as they stand.
                now = time.monotonic()
                if self._writes == 0:
                    lead = True
                    self._light = now - self._idle_since >= LIGHT_GAP_S
                else:
                    # Beside lone writes of a light moment, with nobody waiting (up to lone_writes).
                    lead = (
                        self._light
                        and self._writes < self._lone_writes
                        and self._items == self._writes
                        and not self._queued
                    )
                if lead:
                    me.batch = [me]
                    self._writes += 1
                    self._items += 1
                    if self._writes >= self._lone_writes:
                        self._light = False
                else:
                    self._queued.append(me)
            if not lead:
                me.done.wait()
            if me.batch is not None:
                self._lead(me.batch)
        except BaseException:
            self._abandon(me)
            raise
        if me.error is not None:
            # A new error of the same kind for each caller: one exception raised in several threads
            # would collect all their tracebacks.
            raise type(me.error)(*me.error.args) from me.error
        return self._one(item) if me.result is _UNWRITTEN else me.result

    def _lead(self, batch: list[_Waiter[T, R]]) -> None:
        ended = len(batch)
        batch[0].led = True
        try:
            if ended == 1:
                batch[0].result = self._one(batch[0].item)
            else:
                results = self._many([w.item for w in batch])
                for waiter, result in zip(batch, results, strict=True):
                    if result is not None:
                        waiter.result = result
                self.batches += 1
                self.batched += ended
        except Exception as exc:
            if ended == 1:
                raise  # the leader's own write: it fails as it would alone
            if outcome_unknown(exc):
                for waiter in batch[1:]:
                    waiter.error = exc
                raise
            # Refused: each of the others writes its item alone (in __call__), with its own outcome.
        finally:
            handed = [False]
            try:
                self._hand_over(ended, handed)
            except BaseException:
                if not handed[0]:  # interrupted before it changed anything: the line must go on
                    self._hand_over(ended, handed)
                raise
            finally:
                for waiter in batch[1:]:
                    waiter.done.set()

    def _hand_over(self, ended: int, handed: list[bool] | None = None) -> None:
        """After a write of ``ended`` items: make the first queued thread the next leader, with the
        items queued so far, or end this line of writes. ``handed`` is set once that is done."""
        now = time.monotonic()
        leader = None
        try:
            with self._lock:
                batch = self._queued[: self._max_batch]
                size = len(batch)  # the last call before the changes (see __call__)
                self._items -= ended
                if size:
                    self._queued = self._queued[self._max_batch :]
                    self._items += size
                    batch[0].batch = batch
                    leader = batch[0]
                else:
                    self._writes -= 1
                    if self._writes == 0:
                        self._idle_since = now
                if handed is not None:
                    handed[0] = True
        finally:
            if leader is not None:
                leader.done.set()

    def _abandon(self, me: _Waiter[T, R]) -> None:
        """A thread interrupted before it led what it was given (an asynchronous exception, such as
        Dramatiq's time limit raises): it leaves the queue, or passes the lead on, so that no thread
        is left waiting for a leader that has gone. (One that led hands over in ``_lead``.)"""
        with self._lock:
            if me in self._queued:
                self._queued.remove(me)
                return
            batch = None if me.led else me.batch
        if batch is None:
            return  # a member of a batch in flight (its leader tells it), or it led already
        rest = batch[1:]
        if not rest:
            self._hand_over(1)
            return
        with self._lock:
            self._items -= 1
            rest[0].batch = rest
        rest[0].done.set()
