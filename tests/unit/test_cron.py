"""Fire times (time zones, DST) and the missed-fire plan, on a fixed clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sluice_common import cron
from sluice_common.cron import Schedule, iso, plan_due
from sluice_common.errors import ValidationFailed
from sluice_common.settings import load_settings
from sluice_common.workflow import CronConfig, validate_workflow


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def fires(schedule: str, tz: str, after: datetime, count: int) -> list[str]:
    return [str(iso(at)) for at in Schedule.parse(schedule, tz).next_fires(after, count)]


def test_five_and_six_fields() -> None:
    expected = ["2026-01-01T10:05:00Z", "2026-01-01T10:10:00Z"]
    assert fires("*/5 * * * *", "UTC", utc(2026, 1, 1, 10, 2, 30), 2) == expected
    assert fires("*/20 * * * * *", "UTC", utc(2026, 1, 1, 10, 0, 0), 3) == [
        "2026-01-01T10:00:20Z",
        "2026-01-01T10:00:40Z",
        "2026-01-01T10:01:00Z",
    ]


def test_time_zone_is_wall_time() -> None:
    # 09:00 in Paris is 08:00 UTC in winter and 07:00 UTC in summer.
    assert fires("0 9 * * *", "Europe/Paris", utc(2026, 1, 15), 1) == ["2026-01-15T08:00:00Z"]
    assert fires("0 9 * * *", "Europe/Paris", utc(2026, 7, 15), 1) == ["2026-07-15T07:00:00Z"]
    assert fires("0 9 * * *", "America/New_York", utc(2026, 7, 15), 1) == ["2026-07-15T13:00:00Z"]


@pytest.mark.parametrize("weekday", ["0", "7", "sun", "SUN"])
def test_sunday_fires(weekday: str) -> None:
    # periodiq never fired day-of-week 0; 2026-03-29 is a Sunday.
    assert fires(f"0 12 * * {weekday}", "UTC", utc(2026, 3, 26), 2) == ["2026-03-29T12:00:00Z", "2026-04-05T12:00:00Z"]


def test_a_time_that_does_not_exist_fires_once_at_the_next_valid_time() -> None:
    # Paris, 2026-03-29: 02:00 CET jumps to 03:00 CEST, so 02:30 does not exist that day.
    assert fires("30 2 * * *", "Europe/Paris", utc(2026, 3, 27, 12), 4) == [
        "2026-03-28T01:30:00Z",  # 02:30 CET
        "2026-03-29T01:00:00Z",  # 03:00 CEST, the first valid time after the gap, once
        "2026-03-30T00:30:00Z",  # 02:30 CEST
        "2026-03-31T00:30:00Z",
    ]
    # Every slot in the gap and the first valid one collapse onto one fire.
    assert fires("*/30 * * * *", "Europe/Paris", utc(2026, 3, 29, 0, 15), 3) == [
        "2026-03-29T00:30:00Z",  # 01:30 CET
        "2026-03-29T01:00:00Z",  # 02:00, 02:30 (missing) and 03:00 CEST: one fire
        "2026-03-29T01:30:00Z",  # 03:30 CEST
    ]


def test_a_time_that_occurs_twice_fires_once() -> None:
    # Paris, 2026-10-25: 03:00 CEST goes back to 02:00 CET, so 02:30 happens twice.
    assert fires("30 2 * * *", "Europe/Paris", utc(2026, 10, 23, 12), 3) == [
        "2026-10-24T00:30:00Z",
        "2026-10-25T00:30:00Z",  # 02:30 CEST, the first occurrence only
        "2026-10-26T01:30:00Z",  # 02:30 CET
    ]
    # Started inside the repeated hour (second pass), the repeated wall times are not fired again.
    assert fires("30 2 * * *", "Europe/Paris", utc(2026, 10, 25, 1, 10), 1) == ["2026-10-26T01:30:00Z"]


def test_seconds_across_both_transitions_are_strictly_increasing() -> None:
    for start in (utc(2026, 3, 29, 0, 59, 50), utc(2026, 10, 25, 0, 59, 50)):
        times = Schedule.parse("*/5 * * * * *", "Europe/Paris").next_fires(start, 20)
        assert times == sorted(set(times))
        assert times[0] == start + timedelta(seconds=5)


def test_a_schedule_that_never_matches_has_no_fires() -> None:
    assert Schedule.parse("0 0 30 2 *").next_fires(utc(2026, 1, 1), 3) == []


def test_bad_schedules_and_time_zones_are_rejected_with_their_path() -> None:
    body: dict[str, Any] = {
        "name": "x",
        "trigger": {"type": "cron", "config": {"schedule": "61 * * * *", "timezone": "Mars/Olympus"}},
        "steps": [{"id": "a", "type": "transform", "config": {"value": 1}}],
    }
    with pytest.raises(ValidationFailed) as caught:
        validate_workflow(body)
    paths = {p.path for p in caught.value.problems}
    assert {"$.trigger.config.schedule", "$.trigger.config.timezone"} <= paths


# The missed-fire plan --------------------------------------------------------------------------

EVERY_10S = Schedule.parse("*/10 * * * * *")
NOW = utc(2026, 5, 1, 12, 0, 0)


def plan(after: datetime, tolerance: float = 5, **config: Any) -> cron.Plan:
    config = CronConfig.model_validate({"schedule": "*/10 * * * * *", **config})
    return plan_due(EVERY_10S, config, after, NOW, tolerance)


def test_on_time_and_slightly_late_slots_fire_normally() -> None:
    # A handover gap of 30 s with a tolerance of 60 s: every slot fires, none is missed.
    p = plan(NOW - timedelta(seconds=31), tolerance=60, missed="skip")
    assert [(f.outcome, f.scheduled_at.second) for f in p.fires] == [("fired", s) for s in (30, 40, 50, 0)]
    assert (p.missed, p.last_slot) == (0, NOW)


def test_skip_records_the_missed_slots_in_one_row() -> None:
    p = plan(NOW - timedelta(minutes=10, seconds=1), missed="skip")
    # 60 slots in (11:49:59, 12:00:00]; the last one (12:00:00) is on time.
    assert p.missed == 60
    assert [(f.outcome, f.missed_slots) for f in p.fires] == [("missed", 60), ("fired", 0)]
    assert p.fires[0].scheduled_at == NOW - timedelta(seconds=10)
    assert not p.fires[0].creates_run


def test_run_once_runs_one_catch_up_within_the_grace_window() -> None:
    p = plan(NOW - timedelta(minutes=10, seconds=1), missed="run_once", missedGraceSeconds=120)
    assert [(f.outcome, f.missed_slots, f.creates_run) for f in p.fires] == [("catch_up", 60, True), ("fired", 0, True)]
    # An outage longer than the grace window: nothing recent to catch up.
    p = plan(utc(2026, 5, 1, 11, 0, 0), missed="run_once", missedGraceSeconds=2)
    assert [f.outcome for f in p.fires] == ["missed", "fired"]


def test_all_catches_up_every_slot_within_the_grace_window() -> None:
    p = plan(NOW - timedelta(minutes=10, seconds=1), missed="all", missedGraceSeconds=60)
    outcomes = [(f.outcome, f.missed_slots) for f in p.fires]
    # 11:49:59 .. 11:58:59 is older than the grace: 54 slots counted missed, one row;
    # 11:59:00 .. 11:59:50 (6 slots) caught up; 12:00:00 fires normally.
    assert outcomes == [("missed", 54)] + [("catch_up", 1)] * 6 + [("fired", 0)]
    assert p.missed == 60
    assert [f.scheduled_at for f in p.fires] == sorted(f.scheduled_at for f in p.fires)


def test_all_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cron, "MAX_CATCH_UP", 3)
    p = plan(NOW - timedelta(minutes=1, seconds=1), missed="all", missedGraceSeconds=3600)
    # 6 late slots: the oldest 3 are counted missed, the latest 3 are caught up.
    assert [(f.outcome, f.missed_slots) for f in p.fires] == [("missed", 3)] + [("catch_up", 1)] * 3 + [("fired", 0)]


def test_a_very_long_outage_is_not_scanned_slot_by_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cron, "MAX_SCAN", 100)
    p = plan(NOW - timedelta(days=30), missed="run_once", missedGraceSeconds=60)
    assert not p.exact
    assert p.missed >= 100
    assert [f.outcome for f in p.fires] == ["catch_up", "fired"]
    assert p.last_slot == NOW


def test_nothing_due() -> None:
    p = plan(NOW, missed="all")
    assert (p.fires, p.missed, p.last_slot) == ([], 0, None)


def test_the_redis_link_without_redis() -> None:
    # Nothing listens on port 1: a change is still saved (announcing it must not fail the
    # request), the status says no scheduler, and an explicit refresh reports the failure.
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    link = cron.RedisSchedulerLink(client, load_settings({}))
    link.trigger_changed("5f0c8f0e-0000-4000-8000-000000000000")
    assert link.status() == {"initialized": False, "scheduledWorkflows": 0}
    with pytest.raises(redis.RedisError):
        link.refresh()
