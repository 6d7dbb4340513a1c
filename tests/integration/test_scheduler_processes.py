"""Scheduler replicas as real processes: every slot fires exactly once, through a SIGKILL too.

Schedules have a seconds field, so 20 seconds hold 20 slots. Fire latency is read from
PostgreSQL: ``cron_fires.fired_at`` (the claim's ``clock_timestamp()``) minus the slot time.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from sluice_common.cron import RedisSchedulerLink, status_key
from tests.conftest import SLUICE, process_env
from tests.integration.conftest import Pipeline
from tests.integration.test_scheduler import cron_workflow, db_now, fires, runs, wait_until

WORKFLOWS = 10  # every second each: 10 fires per second between two replicas
Spawn = Callable[[], subprocess.Popen[bytes]]


@pytest.fixture
def spawn(pipeline: Pipeline) -> Iterator[Spawn]:
    procs: list[subprocess.Popen[bytes]] = []
    env = process_env(pipeline.settings.database_url or "", pipeline.redis_url, pipeline.settings.redis_prefix)

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([*SLUICE, "scheduler"], env=env)  # the group's default: run a replica
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def leader_pid(p: Pipeline) -> int:
    raw = p.redis.get(status_key(p.settings.redis_prefix))
    assert raw is not None
    return int(json.loads(raw)["leader"].split(":")[1])


def check_every_slot_once(p: Pipeline, wf: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Every second in [start, end] fired once, each with its own run; return those fires."""
    rows = [f for f in fires(p, wf) if start <= f["scheduled_at"] <= end]
    slots = [f["scheduled_at"] for f in rows]
    expected = [start + timedelta(seconds=i) for i in range(int((end - start).total_seconds()) + 1)]
    assert slots == expected, "a slot was lost or fired twice"
    assert all(f["outcome"] == "fired" and f["run_id"] is not None for f in rows)
    made = [r for r in runs(p, wf) if start.isoformat().replace("+00:00", "Z") <= r["trigger_data"]["scheduledAt"]]
    scheduled = [r["trigger_data"]["scheduledAt"] for r in made]
    assert len(scheduled) == len(set(scheduled)), "two runs for one slot"
    assert {str(f["run_id"]) for f in rows} <= {str(r["id"]) for r in made}
    return rows


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def test_two_replicas_fire_each_slot_exactly_once(pipeline: Pipeline, spawn: Spawn) -> None:
    owner = pipeline.user()
    link = RedisSchedulerLink(pipeline.redis, pipeline.settings)
    spawn()
    spawn()
    wait_until(lambda: link.status()["initialized"], timeout=20)
    workflows = [cron_workflow(pipeline, owner, "* * * * * *") for _ in range(WORKFLOWS)]
    for wf in workflows:
        link.trigger_changed(wf)
    time.sleep(21)
    latencies = []
    for wf in workflows:
        rows = fires(pipeline, wf)
        start = rows[0]["scheduled_at"]
        end = start + timedelta(seconds=19)
        assert rows[-1]["scheduled_at"] >= end
        on_time = check_every_slot_once(pipeline, wf, start, end)
        latencies += [(f["fired_at"] - f["scheduled_at"]).total_seconds() for f in on_time]
    ms = [round(x * 1000) for x in (p99(latencies), max(latencies))]
    print(f"fire latency over {len(latencies)} slots: p99 {ms[0]} ms, max {ms[1]} ms")
    assert min(latencies) >= 0
    assert p99(latencies) < 1.0


def test_sigkill_of_the_leader_hands_over_without_losing_a_slot(pipeline: Pipeline, spawn: Spawn) -> None:
    owner = pipeline.user()
    link = RedisSchedulerLink(pipeline.redis, pipeline.settings)
    procs = {proc.pid: proc for proc in (spawn(), spawn())}
    wait_until(lambda: link.status()["initialized"], timeout=20)
    wf = cron_workflow(pipeline, owner, "* * * * * *")
    link.trigger_changed(wf)
    first = wait_until(lambda: fires(pipeline, wf), timeout=5)[0]
    time.sleep(3)
    victim = procs[leader_pid(pipeline)]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = db_now(pipeline)
    # The survivor takes over within 15 s, then fires the slots of the gap (late) and goes on.
    resumed = wait_until(
        lambda: [f for f in fires(pipeline, wf) if f["fired_at"] > killed + timedelta(seconds=0.5)], timeout=15
    )[0]
    took = (resumed["fired_at"] - killed).total_seconds()
    assert took < 15
    time.sleep(3)
    check_every_slot_once(pipeline, wf, first["scheduled_at"], killed + timedelta(seconds=took + 2))
    survivor = next(proc for pid, proc in procs.items() if pid != victim.pid)
    assert leader_pid(pipeline) == survivor.pid
    print(f"takeover after SIGKILL: {took:.1f} s")
