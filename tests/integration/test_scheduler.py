"""The cron scheduler on real PostgreSQL and Redis: changes, pause, missed and overlap policies,
status, preview, pruning, the CLI refresh and standalone mode.

Workflow rows are written with SQL and announced with ``RedisSchedulerLink.trigger_changed``,
which is what the API does after each create, update, pause or delete.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg.types.json import Jsonb

from sluice_api.resources.workflows import schedule_body
from sluice_common.cron import PlannedFire, RedisSchedulerLink, leader_key, schedule_preview
from sluice_common.db import open_pool
from sluice_common.errors import ConflictError, NotFoundError
from sluice_common.workflow import CronConfig
from sluice_scheduler import firing
from sluice_scheduler.firing import CronWorkflow, fire
from sluice_scheduler.leadership import RedisLease
from sluice_scheduler.maintenance import prune_history
from sluice_scheduler.scheduler import CronScheduler
from sluice_scheduler.service import create_scheduler
from sluice_standalone.app import Standalone, create_standalone
from tests.conftest import sluice, wait_until
from tests.httpserver import LocalServer
from tests.integration.conftest import Pipeline

NOOP = [{"id": "a", "type": "transform", "config": {"value": 1}}]
NEVER = "0 0 1 1 *"  # once a year: loaded, but never due during a test


def cron_workflow(
    p: Pipeline,
    owner: str,
    schedule: str,
    *,
    steps: list[dict[str, Any]] | None = None,
    updated_ago: float = 0.0,
    **config: Any,
) -> str:
    trigger = {"type": "cron", "config": {"schedule": schedule, **config}}
    with p.pool.connection() as conn:
        row = conn.execute(
            "INSERT INTO workflows (owner_id, name, trigger_type, trigger, steps, created_at, updated_at) "
            "VALUES (%s, 'cron', 'cron', %s, %s, now() - make_interval(secs => %s), "
            "now() - make_interval(secs => %s)) RETURNING id",
            (owner, Jsonb(trigger), Jsonb(steps or NOOP), updated_ago, updated_ago),
        ).fetchone()
    assert row is not None
    return str(row["id"])


def set_trigger(p: Pipeline, wf: str, schedule: str, **config: Any) -> None:
    trigger = {"type": "cron", "config": {"schedule": schedule, **config}}
    with p.pool.connection() as conn:
        conn.execute(
            "UPDATE workflows SET trigger = %s, version = version + 1, updated_at = now() WHERE id = %s",
            (Jsonb(trigger), wf),
        )


def fires(p: Pipeline, wf: str) -> list[dict[str, Any]]:
    with p.pool.connection() as conn:
        rows = conn.execute("SELECT * FROM cron_fires WHERE workflow_id = %s ORDER BY scheduled_at", (wf,)).fetchall()
    return [dict(r) for r in rows]


def runs(p: Pipeline, wf: str) -> list[dict[str, Any]]:
    with p.pool.connection() as conn:
        rows = conn.execute("SELECT * FROM runs WHERE workflow_id = %s ORDER BY queued_at", (wf,)).fetchall()
    return [dict(r) for r in rows]


def db_now(p: Pipeline) -> datetime:
    with p.pool.connection() as conn:
        row = conn.execute("SELECT clock_timestamp() AS t").fetchone()
    assert row is not None
    return row["t"]  # type: ignore[no-any-return]


@pytest.fixture
def link(pipeline: Pipeline) -> RedisSchedulerLink:
    return RedisSchedulerLink(pipeline.redis, pipeline.settings)


@pytest.fixture
def scheduler(pipeline: Pipeline, link: RedisSchedulerLink) -> Iterator[Callable[..., CronScheduler]]:
    """Start an in-process scheduler replica (real Redis lease and channel); wait until it leads."""
    made: list[tuple[CronScheduler, threading.Event]] = []

    def make(**overrides: Any) -> CronScheduler:
        settings = pipeline.settings.model_copy(update=overrides)
        sched = create_scheduler(settings, pipeline.pool, pipeline.new_broker(), pipeline.redis)
        stopping = threading.Event()
        sched.start(stopping)
        made.append((sched, stopping))
        wait_until(lambda: link.status()["initialized"])
        return sched

    yield make
    for sched, stopping in made:
        stopping.set()
        sched.join()


def test_status_follows_the_leader(
    pipeline: Pipeline, link: RedisSchedulerLink, scheduler: Callable[..., CronScheduler]
) -> None:
    assert link.status() == {"initialized": False, "scheduledWorkflows": 0}
    owner = pipeline.user()
    for _ in range(3):
        cron_workflow(pipeline, owner, NEVER)
    sched = scheduler()
    assert wait_until(lambda: link.status() == {"initialized": True, "scheduledWorkflows": 3})
    assert sched.status() == {"initialized": True, "scheduledWorkflows": 3}
    sched.lease.release()  # a clean stop hands over at once and clears the status
    assert link.status() == {"initialized": False, "scheduledWorkflows": 0}


def test_created_changed_paused_and_deleted_triggers_take_effect_within_2s(
    pipeline: Pipeline, link: RedisSchedulerLink, scheduler: Callable[..., CronScheduler]
) -> None:
    owner = pipeline.user()
    scheduler()

    # Created: fires within 2 s of the notice.
    created = cron_workflow(pipeline, owner, "* * * * * *")
    link.trigger_changed(created)
    signalled = db_now(pipeline)
    first = wait_until(lambda: fires(pipeline, created), timeout=5)[0]
    assert (first["fired_at"] - signalled).total_seconds() < 2.0
    wait_until(lambda: link.status()["scheduledWorkflows"] == 1)

    # Changed: a yearly schedule becomes every second.
    changed = cron_workflow(pipeline, owner, NEVER)
    link.trigger_changed(changed)
    wait_until(lambda: link.status()["scheduledWorkflows"] == 2)
    time.sleep(1.2)
    assert fires(pipeline, changed) == []
    set_trigger(pipeline, changed, "* * * * * *")
    link.trigger_changed(changed)
    signalled = db_now(pipeline)
    first = wait_until(lambda: fires(pipeline, changed), timeout=5)[0]
    assert (first["fired_at"] - signalled).total_seconds() < 2.0

    # Paused and deleted: nothing fires once the change has committed.
    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE workflows SET status = 'paused', updated_at = now() WHERE id = %s", (created,))
        conn.execute("UPDATE workflows SET deleted_at = now(), updated_at = now() WHERE id = %s", (changed,))
    stopped = db_now(pipeline)
    link.trigger_changed(created)
    link.trigger_changed(changed)
    wait_until(lambda: link.status()["scheduledWorkflows"] == 0, timeout=3)
    time.sleep(2.5)
    for wf in (created, changed):
        assert all(f["fired_at"] < stopped for f in fires(pipeline, wf))

    # Resumed: fires again, and the paused time is not counted as missed.
    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE workflows SET status = 'active', updated_at = now() WHERE id = %s", (created,))
    link.trigger_changed(created)
    resumed = db_now(pipeline)
    wait_until(lambda: any(f["fired_at"] > resumed for f in fires(pipeline, created)), timeout=3)
    rows = fires(pipeline, created)
    assert {f["outcome"] for f in rows} == {"fired"}
    assert sum(f["missed_slots"] for f in rows) == 0


def test_each_fire_creates_one_cron_run_at_the_cron_priority(
    pipeline: Pipeline, link: RedisSchedulerLink, scheduler: Callable[..., CronScheduler]
) -> None:
    owner = pipeline.user()
    wf = cron_workflow(pipeline, owner, "* * * * * *", timezone="Europe/Paris")
    scheduler()
    rows = wait_until(lambda: (r := fires(pipeline, wf)) and len(r) >= 3 and r, timeout=8)
    made = {str(r["id"]): r for r in runs(pipeline, wf)}
    for row in rows:
        run = made[str(row["run_id"])]
        assert (run["trigger_type"], run["priority"], run["status"]) == ("cron", 7, "queued")
        assert run["trigger_data"]["scheduledAt"] == row["scheduled_at"].isoformat().replace("+00:00", "Z")
        assert run["trigger_data"]["timezone"] == "Europe/Paris"
    assert len(made) >= len(rows)


def test_missed_fire_policies(
    pipeline: Pipeline, link: RedisSchedulerLink, scheduler: Callable[..., CronScheduler]
) -> None:
    owner = pipeline.user()
    # Every 2 s, last scheduled 60 s ago: about 29 slots passed while no scheduler ran.
    skip = cron_workflow(pipeline, owner, "*/2 * * * * *", updated_ago=60, missed="skip")
    once = cron_workflow(pipeline, owner, "*/2 * * * * *", updated_ago=60, missed="run_once", missedGraceSeconds=30)
    every = cron_workflow(pipeline, owner, "*/2 * * * * *", updated_ago=600, missed="all", missedGraceSeconds=10)
    # The anchor is the last claimed slot when it is newer than the row: fired 60 s ago.
    with pipeline.pool.connection() as conn:
        conn.execute(
            "INSERT INTO cron_fires (workflow_id, scheduled_at, outcome) "
            "VALUES (%s, date_trunc('second', now()) - interval '60 seconds', 'fired')",
            (every,),
        )
    scheduler(cron_late_tolerance_seconds=2.0)
    for wf in (skip, once, every):
        wait_until(lambda wf=wf: any(f["outcome"] == "fired" and f["run_id"] for f in fires(pipeline, wf)))

    def late(wf: str) -> list[dict[str, Any]]:
        return [f for f in fires(pipeline, wf) if f["outcome"] not in ("fired",)]

    [missed] = late(skip)
    assert missed["outcome"] == "missed"
    assert missed["run_id"] is None
    assert 27 <= missed["missed_slots"] <= 31
    assert schedule_preview(pipeline.pool, skip, owner).missed_count == missed["missed_slots"]

    [caught] = late(once)
    assert caught["outcome"] == "catch_up"
    assert 27 <= caught["missed_slots"] <= 31
    run = pipeline.run(caught["run_id"])
    assert run["trigger_data"]["catchUp"] is True
    assert run["trigger_data"]["missedSlots"] == caught["missed_slots"]

    rows = late(every)
    old = [f for f in rows if f["outcome"] == "missed"]
    recent = [f for f in rows if f["outcome"] == "catch_up"]
    assert len(old) == 1
    assert old[0]["run_id"] is None
    assert 3 <= len(recent) <= 6
    assert all(f["run_id"] for f in recent)
    total = old[0]["missed_slots"] + len(recent)
    assert 27 <= total <= 31
    assert schedule_preview(pipeline.pool, every, owner).missed_count == total


def test_overlap_skip_and_queue_one_with_a_real_worker(
    pipeline: Pipeline, http_server: LocalServer, scheduler: Callable[..., CronScheduler]
) -> None:
    owner = pipeline.user()
    slow = [{"id": "s", "type": "http", "config": {"url": f"{http_server.base}/slow?s=2.5"}}]
    skip = cron_workflow(pipeline, owner, "* * * * * *", steps=slow, overlap="skip")
    queue_one = cron_workflow(pipeline, owner, "* * * * * *", steps=slow, overlap="queue_one")
    allow = cron_workflow(pipeline, owner, "*/2 * * * * *", steps=slow)
    pipeline.start_worker(threads=8)
    scheduler()
    time.sleep(9)

    # skip: never two runs at once; the slots in between are recorded as skipped.
    skip_runs = runs(pipeline, skip)
    outcomes = [f["outcome"] for f in fires(pipeline, skip)]
    assert len(skip_runs) >= 2
    assert "skipped_overlap" in outcomes
    assert outcomes.count("fired") == len(skip_runs)
    for before, after in itertools.pairwise(skip_runs):
        assert before["finished_at"] is not None
        assert before["finished_at"] <= after["queued_at"]

    # queue_one: the next run waits for the running one and starts right after it, never overlapping.
    q_runs = [r for r in runs(pipeline, queue_one) if r["started_at"] is not None]
    assert len(q_runs) >= 3
    for before, after in itertools.pairwise(q_runs):
        assert before["finished_at"] is not None
        assert before["finished_at"] <= after["started_at"]
        assert (after["started_at"] - before["finished_at"]).total_seconds() < 3
    q_fires = fires(pipeline, queue_one)
    assert sum(1 for f in q_fires if f["outcome"] == "deferred") <= 1
    assert any(r["trigger_data"].get("deferred") for r in q_runs)  # started when the previous one ended

    # allow: runs overlap freely.
    a_runs = [r for r in runs(pipeline, allow) if r["started_at"] is not None]
    assert len(a_runs) >= 3
    assert any(
        later["started_at"] < (earlier["finished_at"] or datetime.max.replace(tzinfo=UTC))
        for earlier, later in itertools.pairwise(a_runs)
    )


def test_schedule_preview(pipeline: Pipeline, scheduler: Callable[..., CronScheduler]) -> None:
    owner, other = pipeline.user(), pipeline.user()
    wf = cron_workflow(pipeline, owner, "30 2 * * *", timezone="Europe/Paris", updated_ago=3600)
    manual = pipeline.workflow(owner, NOOP)
    now = datetime(2026, 3, 27, 12, tzinfo=UTC)
    body = schedule_body(schedule_preview(pipeline.pool, wf, owner, count=3, now=now))
    assert body == {
        "workflowId": wf,
        "schedule": "30 2 * * *",
        "timezone": "Europe/Paris",
        "active": True,
        "nextFires": ["2026-03-28T01:30:00Z", "2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"],
        "lastFire": None,
        "nextFire": "2026-03-28T01:30:00Z",
        "missedCount": 0,
    }
    run_id = pipeline.enqueue(wf, owner).run_id
    with pipeline.pool.connection() as conn:
        conn.execute(
            "INSERT INTO cron_fires (workflow_id, scheduled_at, fired_at, outcome, run_id, missed_slots) VALUES "
            "(%s, '2026-03-26T01:30:00Z', '2026-03-26T01:30:00.2Z', 'catch_up', %s, 4)",
            (wf, run_id),
        )
        conn.execute("UPDATE workflows SET status = 'paused' WHERE id = %s", (wf,))
    body = schedule_body(schedule_preview(pipeline.pool, wf, owner, count=1, now=now))
    assert body["lastFire"] == {
        "scheduledAt": "2026-03-26T01:30:00Z",
        "firedAt": "2026-03-26T01:30:00.200000Z",
        "outcome": "catch_up",
        "runId": str(run_id),
    }
    assert (body["active"], body["nextFire"], body["nextFires"], body["missedCount"]) == (
        False,
        None,
        ["2026-03-28T01:30:00Z"],
        4,
    )
    json.dumps(body)
    with pytest.raises(NotFoundError):
        schedule_preview(pipeline.pool, wf, other)
    with pytest.raises(NotFoundError):
        schedule_preview(pipeline.pool, "not-a-uuid", owner)
    with pytest.raises(NotFoundError):
        schedule_preview(pipeline.pool, str(uuid.uuid4()), owner)
    with pytest.raises(ConflictError):
        schedule_preview(pipeline.pool, manual, owner)
    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE workflows SET deleted_at = now() WHERE id = %s", (wf,))
    with pytest.raises(NotFoundError):
        schedule_preview(pipeline.pool, wf, owner)


def test_prune_keeps_recent_history_the_latest_fire_and_missed_counts(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = cron_workflow(pipeline, owner, NEVER)
    with pipeline.pool.connection() as conn:
        for age_days, status in ((40, "succeeded"), (35, "failed"), (31, "queued"), (2, "succeeded")):
            conn.execute(
                "INSERT INTO runs (workflow_id, owner_id, workflow_version, trigger_type, status, max_attempts, "
                "queued_at, finished_at) VALUES (%s, %s, 1, 'cron', %s, 3, now() - make_interval(days => %s), "
                "CASE WHEN %s <> 'queued' THEN now() - make_interval(days => %s) END)",
                (wf, owner, status, age_days, status, age_days),
            )
        for age_days, outcome, missed in ((50, "fired", 0), (45, "missed", 12), (40, "fired", 0), (39, "fired", 0)):
            conn.execute(
                "INSERT INTO cron_fires (workflow_id, scheduled_at, outcome, missed_slots) "
                "VALUES (%s, now() - make_interval(days => %s), %s, %s)",
                (wf, age_days, outcome, missed),
            )
    assert prune_history(pipeline.pool, 30, batch=1) == (2, 2)
    assert sorted(r["status"] for r in runs(pipeline, wf)) == ["queued", "succeeded"]
    left = fires(pipeline, wf)
    assert [(f["outcome"], f["missed_slots"]) for f in left] == [("missed", 12), ("fired", 0)]
    assert schedule_preview(pipeline.pool, wf, owner).missed_count == 12


def test_cli_refresh_and_status(
    pipeline: Pipeline, link: RedisSchedulerLink, scheduler: Callable[..., CronScheduler], service_env: dict[str, str]
) -> None:
    env = {
        **service_env,
        "DATABASE_URL": pipeline.settings.database_url or "",
        "SLUICE_REDIS_PREFIX": pipeline.settings.redis_prefix,
    }
    owner = pipeline.user()
    scheduler()
    wf = cron_workflow(pipeline, owner, "* * * * * *")  # no notice: only a refresh finds it
    time.sleep(1.5)
    assert fires(pipeline, wf) == []
    out = sluice(env, "scheduler", "refresh")
    assert "refresh requested" in out.stdout
    wait_until(lambda: fires(pipeline, wf), timeout=3)
    status = json.loads(sluice(env, "scheduler", "status").stdout.strip().splitlines()[-1])
    assert status == {"initialized": True, "scheduledWorkflows": 1}


def test_standalone_runs_cron_in_process(pipeline: Pipeline) -> None:
    settings = pipeline.settings.model_copy(update={"redis_url": None})
    app: Standalone = create_standalone(settings, pipeline.pool)
    app.start()
    try:
        owner = pipeline.user()
        assert wait_until(lambda: app.scheduler_link.status()["initialized"])
        wf = cron_workflow(pipeline, owner, "* * * * * *")
        app.scheduler_link.trigger_changed(wf)
        signalled = db_now(pipeline)
        first = wait_until(lambda: fires(pipeline, wf), timeout=3)[0]
        assert (first["fired_at"] - signalled).total_seconds() < 2.0
        assert app.scheduler_link.status() == {"initialized": True, "scheduledWorkflows": 1}
        pipeline.wait_for([first["run_id"]], {"succeeded"}, timeout=10)
        with pipeline.pool.connection() as conn:
            conn.execute("UPDATE workflows SET status = 'paused' WHERE id = %s", (wf,))
        app.scheduler_link.trigger_changed(wf)
        wait_until(lambda: app.scheduler_link.status()["scheduledWorkflows"] == 0, timeout=2)
        app.scheduler_link.refresh()
    finally:
        app.stop()
    assert timedelta(0) <= first["fired_at"] - first["scheduled_at"] < timedelta(seconds=1)


def test_lease_one_leader_takeover_on_expiry_and_job_slots_claimed_once(pipeline: Pipeline) -> None:
    prefix = pipeline.settings.redis_prefix
    a, b = RedisLease(pipeline.redis, prefix, 1.0), RedisLease(pipeline.redis, prefix, 1.0)
    assert a.tick()
    assert not b.tick()
    assert a.tick()  # renewal
    assert (a.is_leader(), b.is_leader()) == (True, False)
    # a stops renewing (frozen or killed): it stops acting before its lease lapses, then b leads.
    time.sleep(0.6)
    assert not a.is_leader()
    assert wait_until(b.tick, timeout=2)
    assert not a.tick()
    b.release()
    assert a.tick()  # a clean stop hands over at once
    claims = [lease.claim_job("prune", 42, 60) for lease in (a, b, a)]
    assert claims == [True, False, False]
    assert b.claim_job("prune", 43, 60)


def test_only_the_lease_holder_writes_the_status_even_racing_a_clean_stop(
    pipeline: Pipeline, link: RedisSchedulerLink
) -> None:
    lease = RedisLease(pipeline.redis, pipeline.settings.redis_prefix, 5.0)

    def publish(done: threading.Event) -> None:
        while not done.is_set():
            lease.publish_status({"initialized": True, "scheduledWorkflows": 1})

    for _ in range(5):
        assert lease.tick()
        done = threading.Event()
        writer = threading.Thread(target=publish, args=(done,))
        writer.start()
        assert wait_until(lambda: link.status()["initialized"], timeout=2)
        lease.release()
        time.sleep(0.02)  # the writer keeps trying after the release
        done.set()
        writer.join()
        assert link.status() == {"initialized": False, "scheduledWorkflows": 0}
    # A key left holding this replica's name (a tick that acquired it while release() ran) is
    # taken back by the next tick rather than blocking every replica until it lapses.
    pipeline.redis.set(leader_key(pipeline.settings.redis_prefix), lease.instance, px=5000)
    assert not lease.is_leader()
    assert lease.tick()


@pytest.mark.parametrize("leading", [False, True], ids=["follower", "leader"])
def test_a_tick_racing_a_clean_stop_leaves_no_lease_behind(pipeline: Pipeline, leading: bool) -> None:
    """release() runs while a tick's call to Redis is on its way: whichever lands first, the key
    must not be left naming the stopped replica, keeping every other one out for a whole lease."""
    lease = RedisLease(pipeline.redis, pipeline.settings.redis_prefix, 30.0)
    other = RedisLease(pipeline.redis, pipeline.settings.redis_prefix, 30.0)
    if leading:
        assert lease.tick()
    script = lease._extend if leading else lease._acquire

    def released_meanwhile(*args: Any, **kwargs: Any) -> Any:
        lease.release()  # the stop, just before the tick's call reaches Redis
        return script(*args, **kwargs)

    with mock.patch.object(lease, "_extend" if leading else "_acquire", released_meanwhile):
        assert not lease.tick()
    assert not lease.is_leader()
    assert pipeline.redis.get(leader_key(pipeline.settings.redis_prefix)) is None
    assert other.tick()  # at once, not a lease later


def test_dropped_database_connections_lose_no_slot(pipeline: Pipeline, link: RedisSchedulerLink) -> None:
    owner = pipeline.user()
    wf = cron_workflow(pipeline, owner, "* * * * * *")
    url = pipeline.settings.database_url or ""
    pool = open_pool(pipeline.settings, url, name="scheduler-under-test")
    sched = create_scheduler(pipeline.settings, pool, pipeline.new_broker(), pipeline.redis)
    stopping = threading.Event()
    sched.start(stopping)
    try:
        first = wait_until(lambda: fires(pipeline, wf), timeout=5)[0]
        with psycopg.connect(url, autocommit=True) as admin:
            for _ in range(3):
                time.sleep(1.5)
                # Every connection but the test's own: the scheduler's pool and the test pool alike.
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
        time.sleep(3)
    finally:
        stopping.set()
        sched.join()
        pool.close()
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT scheduled_at FROM cron_fires WHERE workflow_id = %s ORDER BY scheduled_at", (wf,)
        ).fetchall()
    slots = [r[0] for r in rows]
    assert slots[0] == first["scheduled_at"]
    assert slots == [slots[0] + timedelta(seconds=i) for i in range(len(slots))]
    assert len(slots) >= 8


def test_a_slot_claimed_twice_has_one_run_and_a_paused_workflow_none(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf_id = cron_workflow(pipeline, owner, "* * * * * *")
    trigger = {"type": "cron", "config": {"schedule": "* * * * * *"}}
    wf = CronWorkflow(wf_id, owner, trigger, CronConfig.model_validate(trigger["config"]))
    slot = PlannedFire(datetime(2026, 1, 1, tzinfo=UTC), "fired")
    outcome, run_id = fire(pipeline.pool, pipeline.broker, pipeline.settings, wf, slot)
    assert outcome == "fired"
    assert run_id is not None
    # A second scheduler (a frozen leader waking up) claiming the same slot: no second run.
    assert fire(pipeline.pool, pipeline.broker, pipeline.settings, wf, slot) == ("duplicate", None)
    assert [str(r["id"]) for r in runs(pipeline, wf_id)] == [str(run_id)]
    assert [(f["outcome"], f["run_id"]) for f in fires(pipeline, wf_id)] == [("fired", run_id)]
    with pipeline.pool.connection() as conn:
        conn.execute("UPDATE workflows SET status = 'paused' WHERE id = %s", (wf_id,))
    later = PlannedFire(datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC), "fired")
    assert fire(pipeline.pool, pipeline.broker, pipeline.settings, wf, later) == ("stale", None)
    assert len(runs(pipeline, wf_id)) == 1


def test_a_fire_that_starts_a_run_waits_for_the_wal_flush_and_a_missed_slot_does_not(pipeline: Pipeline) -> None:
    """The run of a fire may start, and call out, before a commit that did not wait for the flush
    reaches the disk: a crash would then lose the fire and its run, and the slot, fired again, would
    run twice under another run id and idempotency key. What PostgreSQL says of each fire's commit:"""
    owner = pipeline.user()
    wf_id = cron_workflow(pipeline, owner, "* * * * * *")
    trigger = {"type": "cron", "config": {"schedule": "* * * * * *"}}
    wf = CronWorkflow(wf_id, owner, trigger, CronConfig.model_validate(trigger["config"]))
    modes: list[str] = []
    real = firing._lock_workflow

    def lock_workflow(*args: Any, **kwargs: Any) -> dict[str, Any] | None:
        row = real(*args, **kwargs)
        assert row is not None
        modes.append(row["commit_mode"])  # the transaction's synchronous_commit, as set
        return row

    slots = [
        PlannedFire(datetime(2026, 1, 1, tzinfo=UTC), "fired"),
        PlannedFire(datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC), "catch_up", missed_slots=3),
        PlannedFire(datetime(2026, 1, 1, 0, 0, 2, tzinfo=UTC), "missed"),
    ]
    with mock.patch.object(firing, "_lock_workflow", lock_workflow):
        outcomes = [fire(pipeline.pool, pipeline.broker, pipeline.settings, wf, slot)[0] for slot in slots]
    assert outcomes == ["fired", "catch_up", "missed"]
    assert modes == ["on", "on", "off"]
    assert len(runs(pipeline, wf_id)) == 2


def test_a_schedule_fires_at_its_local_wall_time(pipeline: Pipeline, scheduler: Callable[..., CronScheduler]) -> None:
    # Kathmandu is UTC+05:45: read as UTC, this schedule would fire hours away from now.
    tz = ZoneInfo("Asia/Kathmandu")
    target = (datetime.now(UTC) + timedelta(seconds=6)).replace(microsecond=0)
    local = target.astimezone(tz)
    owner = pipeline.user()
    wf = cron_workflow(pipeline, owner, f"{local.second} {local.minute} {local.hour} * * *", timezone=tz.key)
    scheduler()
    [row] = wait_until(lambda: fires(pipeline, wf), timeout=10)
    assert row["scheduled_at"] == target
    assert row["outcome"] == "fired"
    assert timedelta(0) <= row["fired_at"] - target < timedelta(seconds=1)
