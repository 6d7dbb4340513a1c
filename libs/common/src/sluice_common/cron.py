"""Cron schedules as the scheduler and the API both need them.

- :class:`Schedule`: fire times of a cron expression in an IANA time zone, computed in local wall
  time with the DST rules of Sluice: a wall time that does not exist (spring forward) fires once
  at the first valid instant after the gap; a wall time that occurs twice (fall back) fires once,
  at its first occurrence.
- :func:`plan_due`: what to do with the slots that are due, given the workflow's missed-fire
  policy: on-time and slightly late slots fire normally, older ones (everything was down) are
  skipped, caught up once, or all caught up within the grace window.
- :func:`schedule_preview`: a cron workflow's next fires, last fire and missed count, as data
  (:class:`ScheduleSummary`; the API shapes it into the ``GET /api/workflows/{id}/schedule`` body).
- :class:`RedisSchedulerLink`: the API's side of :class:`~sluice_common.schedulerlink.SchedulerLink`
  in queue mode, and the Redis key names the scheduler and the link share.

Everything here is pure computation or one SQL read, so it is unit-testable with a fixed clock;
the scheduler service owns leadership, timing and firing.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import uuid
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import redis
from croniter import CroniterBadDateError, croniter

from sluice_common.db import Pool
from sluice_common.errors import ConflictError, FieldProblem, NotFoundError, ValidationFailed
from sluice_common.settings import Settings
from sluice_common.workflow import CronConfig, parse_cron

log = logging.getLogger(__name__)

# A missed-fire scan stops counting slot by slot after this many slots (an every-second schedule
# down for more than half a day) and jumps to the grace window; the missed count is then a floor.
MAX_SCAN = 50_000
# Policy ``all`` creates at most this many catch-up runs for one outage; older slots count as missed.
MAX_CATCH_UP = 1000
PREVIEW_MAX = 100
REFRESH_ALL = "*"


# Redis names shared by the scheduler and the link -----------------------------------------------


def leader_key(prefix: str) -> str:
    return f"{prefix}:scheduler:leader"


def status_key(prefix: str) -> str:
    return f"{prefix}:scheduler:status"


def changes_channel(prefix: str) -> str:
    return f"{prefix}:scheduler:changes"


# Fire times -------------------------------------------------------------------------------------


def _wall(instant: datetime, tz: zoneinfo.ZoneInfo) -> datetime:
    return instant.astimezone(tz).replace(tzinfo=None)


@functools.lru_cache(maxsize=4096)
def _parsed(expression: str, has_seconds: bool) -> croniter:
    # Many workflows share a handful of expressions (``0 * * * *``): parse each once.
    return croniter(expression, datetime(2000, 1, 1), second_at_beginning=has_seconds)


@dataclass(frozen=True)
class Schedule:
    """A cron expression (5 fields, or 6 with seconds first) in an IANA time zone."""

    expression: str
    has_seconds: bool
    tz: zoneinfo.ZoneInfo
    # Parsing an expression costs several times more than a step; each iteration starts from a
    # shallow copy of this parsed one (its expanded fields are only read).
    _parsed: croniter = field(compare=False, repr=False)

    @classmethod
    def parse(cls, schedule: str, timezone: str = "UTC") -> Schedule:
        expression, has_seconds = parse_cron(schedule)
        return cls(expression, has_seconds, zoneinfo.ZoneInfo(timezone), _parsed(expression, has_seconds))

    @classmethod
    def of(cls, config: CronConfig) -> Schedule:
        return cls.parse(config.schedule, config.timezone)

    def instant(self, wall: datetime) -> datetime:
        """The UTC instant of a naive local wall time, by Sluice's DST rules."""
        first = wall.replace(tzinfo=self.tz, fold=0).astimezone(UTC)
        if _wall(first, self.tz) == wall:
            return first  # exists; fold=0 is the first occurrence of an ambiguous time
        # In a gap, fold=0 reads the wall time with the offset from before the transition (an
        # instant after the gap) and fold=1 with the offset after it (an instant before the gap).
        # The next valid time is the transition itself: the first instant whose wall time is later.
        lo = int(wall.replace(tzinfo=self.tz, fold=1).astimezone(UTC).timestamp())
        hi = int(first.timestamp()) + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if _wall(datetime.fromtimestamp(mid, UTC), self.tz) > wall:
                hi = mid
            else:
                lo = mid + 1
        return datetime.fromtimestamp(lo, UTC)

    def fires_after(self, after: datetime) -> Iterator[datetime]:
        """Fire instants (UTC, strictly increasing) strictly after the aware ``after``."""
        last = after.astimezone(UTC)
        it = copy.copy(self._parsed)
        it.set_current(_wall(last, self.tz), force=True)
        while True:
            try:
                wall = it.get_next(datetime)
            except CroniterBadDateError:
                return  # an expression that never matches again (for example 30 February)
            at = self.instant(wall)
            # Skips the second pass of a repeated hour and collapses gap times onto one instant.
            if at > last:
                last = at
                yield at

    def next_after(self, after: datetime) -> datetime | None:
        return next(self.fires_after(after), None)

    def next_fires(self, after: datetime, count: int) -> list[datetime]:
        out = []
        for at in self.fires_after(after):
            out.append(at)
            if len(out) >= count:
                break
        return out


# Planning the due slots -------------------------------------------------------------------------

Outcome = Literal["fired", "catch_up", "missed"]


@dataclass(frozen=True)
class PlannedFire:
    """One ``cron_fires`` row to claim: a slot, what happens to it, and the missed slots it covers."""

    scheduled_at: datetime
    outcome: Outcome
    missed_slots: int = 0

    @property
    def creates_run(self) -> bool:
        return self.outcome != "missed"


@dataclass(frozen=True)
class Plan:
    fires: list[PlannedFire]
    last_slot: datetime | None  # the latest slot considered (<= now), the next anchor
    missed: int  # slots that did not run on time
    exact: bool = True  # False when the scan jumped (MAX_SCAN) and ``missed`` is a floor


def plan_due(schedule: Schedule, config: CronConfig, after: datetime, now: datetime, tolerance_seconds: float) -> Plan:
    """Decide what to do with every slot in ``(after, now]``.

    A slot at most ``tolerance_seconds`` old fires normally, however late: that covers a busy
    loop, a database hiccup and a leader handover (a new leader takes over within about ten
    seconds and fires the slots of the gap as ordinary fires). An older slot was missed because
    no scheduler was running, and the workflow's ``missed`` policy applies: ``skip`` records it,
    ``run_once`` runs one catch-up for the latest missed slot if it is within the grace window,
    ``all`` runs one per missed slot within the grace window. Missed slots are counted either way.
    """
    late_cutoff = now - timedelta(seconds=tolerance_seconds)
    grace_cutoff = now - timedelta(seconds=max(config.missed_grace_seconds, tolerance_seconds))
    on_time: list[datetime] = []
    old_count = 0  # missed slots older than the grace window
    old_last: datetime | None = None
    recent: list[datetime] = []  # missed slots within the grace window
    last: datetime | None = None
    exact = True
    slots = schedule.fires_after(after)
    for scanned, slot in enumerate(slots, 1):
        if slot > now:
            break
        last = slot
        if slot >= late_cutoff:
            on_time.append(slot)
        elif slot >= grace_cutoff:
            recent.append(slot)
        else:
            old_count += 1
            old_last = slot
            if scanned >= MAX_SCAN:
                exact = False
                slots = schedule.fires_after(grace_cutoff - timedelta(microseconds=1))
                break
    if not exact:  # continue from the grace window after the jump
        for slot in slots:
            if slot > now:
                break
            last = slot
            (on_time if slot >= late_cutoff else recent).append(slot)

    fires: list[PlannedFire] = []
    missed = old_count + len(recent)
    if config.missed == "all":
        if len(recent) > MAX_CATCH_UP:
            dropped = recent[:-MAX_CATCH_UP]
            old_count += len(dropped)
            old_last = dropped[-1]
            recent = recent[-MAX_CATCH_UP:]
        if old_count:
            assert old_last is not None
            fires.append(PlannedFire(old_last, "missed", old_count))
        fires.extend(PlannedFire(slot, "catch_up", 1) for slot in recent)
    elif missed:
        latest = recent[-1] if recent else old_last
        assert latest is not None
        outcome: Outcome = "catch_up" if config.missed == "run_once" and recent else "missed"
        fires.append(PlannedFire(latest, outcome, missed))
    fires.extend(PlannedFire(slot, "fired") for slot in on_time)
    return Plan(fires, last, missed, exact)


# Preview ----------------------------------------------------------------------------------------


def iso(at: datetime | None) -> str | None:
    """UTC ISO 8601 with a ``Z``, the way the API writes times."""
    if at is None:
        return None
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class RecordedFire:
    """A fire as ``cron_fires`` records it."""

    scheduled_at: datetime
    fired_at: datetime
    outcome: str
    run_id: uuid.UUID | None


@dataclass(frozen=True)
class ScheduleSummary:
    """A cron workflow's schedule as of one moment; every time is in UTC."""

    workflow_id: uuid.UUID
    schedule: str
    timezone: str
    active: bool
    next_fires: list[datetime]  # given even while the workflow is paused: what resuming it would give
    last_fire: RecordedFire | None
    missed_count: int

    @property
    def next_fire(self) -> datetime | None:
        """The next fire, or ``None`` while the workflow is paused."""
        return self.next_fires[0] if self.active and self.next_fires else None


def schedule_preview(
    pool: Pool, workflow_id: str, owner_id: str, count: int = 5, now: datetime | None = None
) -> ScheduleSummary:
    """The schedule of one of ``owner_id``'s cron workflows: next fires, last fire, missed count.

    Raises :class:`NotFoundError` for an unknown, deleted or someone else's workflow and
    :class:`ConflictError` for a workflow without a cron trigger.
    """
    if not 1 <= count <= PREVIEW_MAX:
        raise ValidationFailed([FieldProblem("$.count", f"must be from 1 to {PREVIEW_MAX}")])
    try:
        wf_id, user_id = str(uuid.UUID(str(workflow_id))), str(uuid.UUID(str(owner_id)))
    except ValueError:
        raise NotFoundError("no such workflow") from None
    with pool.connection() as conn:
        wf = conn.execute(
            "SELECT trigger_type, trigger, status FROM workflows "
            "WHERE id = %s AND owner_id = %s AND deleted_at IS NULL",
            (wf_id, user_id),
        ).fetchone()
        if wf is None:
            raise NotFoundError("no such workflow")
        if wf["trigger_type"] != "cron":
            raise ConflictError("the workflow has no cron trigger, so it has no schedule")
        last = conn.execute(
            "SELECT scheduled_at, fired_at, outcome, run_id FROM cron_fires WHERE workflow_id = %s "
            "ORDER BY scheduled_at DESC LIMIT 1",
            (wf_id,),
        ).fetchone()
        missed = conn.execute(
            "SELECT coalesce(sum(missed_slots), 0) AS n FROM cron_fires WHERE workflow_id = %s AND missed_slots > 0",
            (wf_id,),
        ).fetchone()
    try:
        config = CronConfig.model_validate((wf["trigger"] or {}).get("config", {}))
    except ValueError as exc:  # pydantic's ValidationError; only rows written around the API
        raise ConflictError(f"the workflow's cron trigger is invalid: {exc}") from None
    schedule = Schedule.of(config)
    nexts = schedule.next_fires(now or datetime.now(UTC), count)
    return ScheduleSummary(
        workflow_id=uuid.UUID(wf_id),
        schedule=config.schedule,
        timezone=config.timezone,
        active=wf["status"] == "active",
        next_fires=[at.astimezone(UTC) for at in nexts],
        last_fire=None
        if last is None
        else RecordedFire(
            scheduled_at=last["scheduled_at"].astimezone(UTC),
            fired_at=last["fired_at"].astimezone(UTC),
            outcome=last["outcome"],
            run_id=last["run_id"],
        ),
        missed_count=int(missed["n"]) if missed else 0,
    )


# The API's link to the scheduler in queue mode --------------------------------------------------


class RedisSchedulerLink:
    """:class:`~sluice_common.schedulerlink.SchedulerLink` over Redis.

    Changes are published on a channel every scheduler replica listens to (the leader acts on
    them within milliseconds; a missed message is caught by the leader's periodic full reload).
    The status is a key the leader rewrites every few seconds with a short expiry, so it reads
    ``initialized: false`` soon after the last scheduler stops.
    """

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._client = client
        self._prefix = settings.redis_prefix

    def trigger_changed(self, workflow_id: str) -> None:
        """Announce a committed change. Never raises: the change is already saved, and without
        Redis the leader still picks it up with its periodic full reload (within 30 s)."""
        try:
            self._client.publish(changes_channel(self._prefix), str(workflow_id))
        except redis.RedisError:
            log.warning("could not announce the change of workflow %s; the scheduler reloads it later", workflow_id)

    def refresh(self) -> None:
        """Ask for a full reload; raises ``redis.RedisError`` if Redis cannot be reached."""
        self._client.publish(changes_channel(self._prefix), REFRESH_ALL)

    def status(self) -> dict[str, object]:
        """The leader's status; not initialized when no scheduler leads or Redis cannot be reached."""
        try:
            raw = self._client.get(status_key(self._prefix))
        except redis.RedisError:
            log.warning("cannot read the scheduler status from Redis", exc_info=True)
            raw = None
        if raw is None:
            return {"initialized": False, "scheduledWorkflows": 0}
        data = json.loads(raw)
        return {
            "initialized": bool(data.get("initialized")),
            "scheduledWorkflows": int(data.get("scheduledWorkflows", 0)),
        }
