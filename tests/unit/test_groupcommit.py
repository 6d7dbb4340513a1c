"""GroupCommit's rule with plain functions in threads: who writes, with whom, and that nobody is
left waiting (the database side is in tests/integration/test_inserts.py and
test_claims_and_finishes.py)."""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import psycopg
import psycopg_pool
import pytest

from sluice_common import groupcommit
from sluice_common.groupcommit import GroupCommit, _Signal, outcome_unknown


class Interrupted(BaseException):
    """What an asynchronous exception (Dramatiq's time limit) raises in a thread."""


class Store:
    """``one`` and ``many`` that record their calls; ``one`` of the item(s) ``hold`` waits for ``go``."""

    def __init__(self, hold: int | frozenset[int] | None = None, left_out: frozenset[int] = frozenset()) -> None:
        self.hold = frozenset() if hold is None else frozenset({hold}) if isinstance(hold, int) else hold
        self.left_out = left_out
        self.go = threading.Event()
        self.ones: list[int] = []
        self.manys: list[list[int]] = []
        self.fail_many: Exception | None = None
        self.fail_one: frozenset[int] = frozenset()

    def one(self, item: int) -> str:
        self.ones.append(item)
        if item in self.hold:
            assert self.go.wait(10)
        if item in self.fail_one:
            raise ValueError(f"bad {item}")
        return f"one:{item}"

    def many(self, items: Sequence[int]) -> list[str | None]:
        self.manys.append(list(items))
        if self.fail_many is not None:
            raise self.fail_many
        return [None if i in self.left_out else f"many:{i}" for i in items]


def wait_for(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def interrupt(thread: threading.Thread) -> None:
    """Raise Interrupted in ``thread`` the next time it runs Python, as Dramatiq's time limit does."""
    assert ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(Interrupted))


def recording(group: GroupCommit[int, str], outcomes: dict[int, object]) -> Callable[[int], None]:
    """A thread's target: call ``group`` and record what it returned, or the Interrupted it raised."""

    def call(item: int) -> None:
        try:
            outcomes[item] = group(item)
        except Interrupted as exc:
            outcomes[item] = exc

    return call


def behind_a_held_write(store: Store, group: GroupCommit[int, str], items: list[int]) -> list[Future[str]]:
    """Start the held write (item 0), queue ``items`` behind it, let it go; futures of all of them."""
    threads = ThreadPoolExecutor(len(items) + 1)
    first = threads.submit(group, 0)
    wait_for(lambda: store.ones == [0])
    futures = []
    for queued, item in enumerate(items, start=1):
        futures.append(threads.submit(group, item))
        wait_for(lambda queued=queued: len(group._queued) == queued)
    store.go.set()
    threads.shutdown(wait=True)
    return [first, *futures]


def test_a_lone_caller_writes_alone_at_once() -> None:
    store = Store()
    group = GroupCommit(store.one, store.many, lone_writes=1)
    assert [group(1), group(2)] == ["one:1", "one:2"]
    assert (store.ones, store.manys, group.batches) == ([1, 2], [], 0)
    assert (group._writes, group._items) == (0, 0)  # idle


def test_callers_behind_a_write_go_in_together_each_with_its_result() -> None:
    store = Store(hold=0)
    group = GroupCommit(store.one, store.many, lone_writes=1)
    results = [f.result() for f in behind_a_held_write(store, group, [1, 2, 3])]
    assert results == ["one:0", "many:1", "many:2", "many:3"]
    assert store.manys == [[1, 2, 3]]
    assert (group.batches, group.batched) == (1, 3)
    assert (group._writes, group._items) == (0, 0)  # idle
    assert not group._queued


def test_a_batch_takes_at_most_max_batch_and_the_rest_follow() -> None:
    store = Store(hold=0)
    group = GroupCommit(store.one, store.many, max_batch=2, lone_writes=1)
    results = [f.result() for f in behind_a_held_write(store, group, [1, 2, 3])]
    assert results == ["one:0", "many:1", "many:2", "one:3"]
    assert store.manys == [[1, 2]]


def test_an_item_the_batch_leaves_out_is_written_alone_by_its_caller() -> None:
    store = Store(hold=0, left_out=frozenset({2}))
    group = GroupCommit(store.one, store.many, lone_writes=1)
    results = [f.result() for f in behind_a_held_write(store, group, [1, 2, 3])]
    assert results == ["one:0", "many:1", "one:2", "many:3"]


def test_a_failed_batch_is_written_alone_and_only_the_bad_item_fails() -> None:
    store = Store(hold=0)
    store.fail_many = psycopg.errors.UniqueViolation("refused by PostgreSQL: rolled back")
    store.fail_one = frozenset({2})
    group = GroupCommit(store.one, store.many, lone_writes=1)
    futures = behind_a_held_write(store, group, [1, 2, 3])
    assert [futures[i].result() for i in (0, 1, 3)] == ["one:0", "one:1", "one:3"]
    with pytest.raises(ValueError, match="bad 2"):
        futures[2].result()
    assert group.batches == 0
    assert (group._writes, group._items) == (0, 0)  # idle


@pytest.mark.parametrize(
    "error",
    [
        psycopg.OperationalError("the connection broke before PostgreSQL answered"),
        psycopg_pool.PoolTimeout("no connection in time"),
        psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
    ],
    ids=["connection-lost", "pool-timeout", "backend-terminated"],
)
def test_a_batch_whose_outcome_is_unknown_is_not_written_again_and_each_caller_gets_the_error(error: Exception) -> None:
    """The statement may have committed: written again alone, every item would be stored twice."""
    store = Store(hold=0)
    store.fail_many = error
    group = GroupCommit(store.one, store.many, lone_writes=1)
    futures = behind_a_held_write(store, group, [1, 2, 3])
    assert futures[0].result() == "one:0"
    assert futures[1].exception() is error  # the batch's leader, whose statement it was
    for future in futures[2:]:
        raised = future.exception()
        assert type(raised) is type(error)
        assert raised is not error  # one exception object per thread
        assert raised.__cause__ is error
    assert store.ones == [0]  # nothing written again
    assert store.manys == [[1, 2, 3]]
    assert (group._writes, group._items) == (0, 0)  # idle
    assert not group._queued
    assert group(4) == "one:4"


def test_only_errors_that_leave_the_outcome_open_count_as_unknown() -> None:
    assert outcome_unknown(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert outcome_unknown(psycopg.InterfaceError("the connection is closed"))
    assert outcome_unknown(psycopg_pool.PoolTimeout("couldn't get a connection"))
    assert outcome_unknown(psycopg.errors.AdminShutdown("terminating connection"))
    assert outcome_unknown(psycopg.errors.ConnectionFailure("connection failure"))
    assert not outcome_unknown(psycopg.errors.UniqueViolation("duplicate key"))
    assert not outcome_unknown(psycopg.errors.SerializationFailure("could not serialize"))
    assert not outcome_unknown(psycopg.errors.LockNotAvailable("busy"))
    assert not outcome_unknown(ValueError("a bug before the statement was sent"))


def test_a_thread_interrupted_when_made_leader_passes_the_lead_on() -> None:
    """The first queued thread gets an asynchronous exception; it arrives when the thread wakes to
    lead the next batch. The batch's other member must still be written, and the group go idle."""
    store = Store(hold=0)
    group = GroupCommit(store.one, store.many, lone_writes=1)
    outcomes: dict[int, object] = {}
    call = recording(group, outcomes)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    threads[0].start()
    wait_for(lambda: store.ones == [0])
    threads[1].start()
    wait_for(lambda: len(group._queued) == 1)
    threads[2].start()
    wait_for(lambda: len(group._queued) == 2)
    # Delivered once the thread runs Python again: when the held write ends and it is woken to lead.
    interrupt(threads[1])
    store.go.set()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert outcomes[0] == "one:0"
    assert isinstance(outcomes[1], Interrupted)
    assert outcomes[2] == "one:2"  # led by itself, alone
    assert store.manys == []
    assert (group._writes, group._items) == (0, 0)  # idle
    assert not group._queued
    assert group(4) == "one:4"


def interrupted_once_it_has_the_lock(group: GroupCommit[int, str], thread: threading.Thread) -> None:
    """Start ``thread`` while the group's lock is held, and interrupt it: the exception lands at
    the first point it checks for one after it has taken the lock, inside the group's bookkeeping."""
    with group._lock:
        thread.start()
        time.sleep(0.05)  # it waits for the lock, where no exception is delivered
        interrupt(thread)


@pytest.mark.parametrize("lone_writes", [1, 2], ids=["queued-behind", "beside"])
def test_a_thread_interrupted_as_it_joins_the_group_leaves_it_as_it_found_it(lone_writes: int) -> None:
    """Behind a write (it queues) or beside a lone one (it leads its own): either way the
    exception comes after its bookkeeping, which it must undo, or the group waits for it for ever."""
    store = Store(hold=0)
    group = GroupCommit(store.one, store.many, lone_writes=lone_writes)
    outcomes: dict[int, object] = {}
    call = recording(group, outcomes)

    first = threading.Thread(target=call, args=(0,))
    first.start()
    wait_for(lambda: store.ones == [0])
    joining = threading.Thread(target=call, args=(1,))
    interrupted_once_it_has_the_lock(group, joining)
    joining.join(10)
    assert isinstance(outcomes[1], Interrupted)
    store.go.set()
    first.join(10)
    assert outcomes[0] == "one:0"
    assert (group._writes, group._items, group._queued) == (0, 0, [])  # idle
    assert group(2) == "one:2"


def test_a_leader_interrupted_as_it_hands_over_still_wakes_its_batch_and_the_next_leader() -> None:
    store = Store(hold=0)
    in_many, go_many = threading.Event(), threading.Event()

    def many(items: Sequence[int]) -> list[str | None]:
        in_many.set()
        assert go_many.wait(10)
        return store.many(items)

    group = GroupCommit(store.one, many, lone_writes=1)
    outcomes: dict[int, object] = {}
    call = recording(group, outcomes)

    threads = {i: threading.Thread(target=call, args=(i,)) for i in range(4)}
    threads[0].start()
    wait_for(lambda: store.ones == [0])
    threads[1].start()
    wait_for(lambda: len(group._queued) == 1)
    threads[2].start()
    wait_for(lambda: len(group._queued) == 2)
    store.go.set()  # 0's write ends: 1 leads [1, 2]
    assert in_many.wait(10)
    threads[3].start()
    wait_for(lambda: len(group._queued) == 1)
    with group._lock:
        go_many.set()  # 1's batch is written; it waits for the lock to hand over to 3
        time.sleep(0.05)
        interrupt(threads[1])
    for thread in threads.values():
        thread.join(10)
        assert not thread.is_alive()
    assert isinstance(outcomes[1], Interrupted)  # after its batch was written
    assert (outcomes[0], outcomes[2], outcomes[3]) == ("one:0", "many:2", "one:3")
    assert store.manys == [[1, 2]]
    assert (group._writes, group._items, group._queued) == (0, 0, [])  # idle
    assert group(4) == "one:4"


def test_with_two_lone_writes_a_second_caller_goes_beside_a_lone_write_and_a_third_waits() -> None:
    store = Store(hold=frozenset({0, 1}))
    group = GroupCommit(store.one, store.many)
    threads = ThreadPoolExecutor(4)
    futures = [threads.submit(group, 0)]
    wait_for(lambda: store.ones == [0])
    futures.append(threads.submit(group, 1))  # beside the lone write, at once
    wait_for(lambda: store.ones == [0, 1])
    futures.append(threads.submit(group, 2))  # two writes in flight: it waits
    wait_for(lambda: len(group._queued) == 1)
    futures.append(threads.submit(group, 3))
    wait_for(lambda: len(group._queued) == 2)
    store.go.set()
    threads.shutdown(wait=True)
    assert [f.result() for f in futures] == ["one:0", "one:1", "many:2", "many:3"]
    assert store.manys == [[2, 3]]
    assert (group._writes, group._items) == (0, 0)  # idle


def test_a_light_moment_lets_one_pair_go_side_by_side_then_callers_batch_until_the_group_idles() -> None:
    """Once two lone writes have gone side by side, the line is load until the group goes idle:
    writes that keep overlapping one by one would otherwise never batch."""
    store = Store(hold=frozenset({0, 2}))
    group = GroupCommit(store.one, store.many)
    threads = ThreadPoolExecutor(4)
    futures = [threads.submit(group, 0)]
    wait_for(lambda: store.ones == [0])
    assert group(1) == "one:1"  # beside the held write, and done
    futures.append(threads.submit(group, 2))  # one lone write in flight again, but the moment is used
    wait_for(lambda: len(group._queued) == 1)
    store.go.set()
    threads.shutdown(wait=True)
    assert [f.result() for f in futures] == ["one:0", "one:2"]
    assert store.ones == [0, 1, 2]  # 2 went after 0, not beside it
    assert (group._writes, group._items) == (0, 0)


def test_with_two_lone_writes_under_steady_load_a_second_caller_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """No idle gap before the write in flight: the load is steady, so callers queue and batch."""
    monkeypatch.setattr(groupcommit, "LIGHT_GAP_S", 60.0)
    store = Store(hold=0)
    group = GroupCommit(store.one, store.many)
    assert group(5) == "one:5"  # the group was idle a moment ago, not 60 s
    store.ones.clear()
    futures = behind_a_held_write(store, group, [1, 2])
    assert [f.result() for f in futures] == ["one:0", "many:1", "many:2"]
    assert store.manys == [[1, 2]]


def test_with_two_lone_writes_a_caller_behind_a_batch_waits() -> None:
    """A batch in flight means load: a newcomer joins the next batch rather than writing beside it."""
    store = Store(hold=frozenset({0, 1}))
    in_batch = threading.Event()
    go = threading.Event()

    def many(items: Sequence[int]) -> list[str | None]:
        in_batch.set()
        assert go.wait(10)
        return store.many(items)

    group = GroupCommit(store.one, many)
    threads = ThreadPoolExecutor(4)
    futures = [threads.submit(group, 0)]
    wait_for(lambda: store.ones == [0])
    futures.append(threads.submit(group, 1))  # beside the lone write 0
    wait_for(lambda: store.ones == [0, 1])
    futures += [threads.submit(group, 2), threads.submit(group, 3)]
    wait_for(lambda: len(group._queued) == 2)
    store.go.set()  # 0 ends; 2 and 3 go in a batch
    assert in_batch.wait(10)
    # Both lone writes have ended (the later one to end would otherwise hand its line on to 4).
    assert [futures[0].result(timeout=10), futures[1].result(timeout=10)] == ["one:0", "one:1"]
    futures.append(threads.submit(group, 4))
    wait_for(lambda: len(group._queued) == 1)  # it waits, though only one write is in flight
    go.set()
    threads.shutdown(wait=True)
    assert [f.result() for f in futures] == ["one:0", "one:1", "many:2", "many:3", "one:4"]
    assert (store.ones, store.manys) == ([0, 1, 4], [[2, 3]])
    assert (group._writes, group._items) == (0, 0)


def test_a_signal_wakes_its_waiter_whether_set_before_or_during_the_wait() -> None:
    early = _Signal()
    early.set()
    early.wait()  # returns at once

    late = _Signal()
    woken = threading.Event()

    def waiter() -> None:
        late.wait()
        woken.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    assert not woken.wait(0.05)  # still waiting
    late.set()
    thread.join(10)
    assert woken.is_set()
