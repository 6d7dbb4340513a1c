"""How the dashboard shows things: times, durations, cron in words, the step timeline, diffs, charts.

Pure functions of the data the queries return, so that they are tested without a server.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from cron_descriptor import Options, get_description

from sluice_common import runstate
from sluice_common.cron import Schedule
from sluice_common.runs import QueueMinute
from sluice_common.workflow import CronConfig

# What a run page offers: the run state machine's own sets (a cancel stops any unfinished run).
FINISHED = runstate.TERMINAL
CANCELLABLE = runstate.UNFINISHED
RETRYABLE = frozenset({runstate.RunStatus.FAILED})


@functools.cache
def static_url(name: str) -> str:
    """A static file's URL with its content's hash: a changed file is a new URL, fetched again."""
    digest = hashlib.sha256((resources.files("sluice_api.dashboard") / "static" / name).read_bytes()).hexdigest()
    return f"/static/{name}?v={digest[:12]}"


def when(at: datetime | None) -> str:
    """A time in UTC, to the second."""
    return "—" if at is None else at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(at: datetime | None, now: datetime | None = None) -> str:
    if at is None:
        return "—"
    seconds = ((now or datetime.now(UTC)) - at).total_seconds()
    later = seconds < 0
    seconds = abs(seconds)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min"), (1, "s")):
        if seconds >= size or unit == "s":
            text = f"{int(seconds // size)} {unit}"
            return f"in {text}" if later else f"{text} ago"
    raise AssertionError("unreachable")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def short_id(value: Any) -> str:
    return str(value)[:8]


def parse_utc_input(raw: str | None) -> datetime | None:
    """A ``datetime-local`` field (``2030-01-31T08:00``), read as UTC; None when empty or malformed."""
    if not raw:
        return None
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


# Triggers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TriggerView:
    kind: str
    words: str  # "Every 5 minutes (Europe/Paris)", "Webhook", "Manual"
    next_fire: datetime | None


def cron_words(schedule: str) -> str:
    """A cron expression in English; the expression itself when it cannot be described."""
    options = Options()
    options.use_24hour_time_format = True
    try:
        return str(get_description(schedule, options))
    except Exception:  # the library raises its own several kinds for what croniter accepts
        return schedule


def trigger_view(trigger: dict[str, Any], active: bool, now: datetime | None = None) -> TriggerView:
    kind = str(trigger.get("type", "manual"))
    if kind != "cron":
        return TriggerView(kind, "Webhook" if kind == "webhook" else "Manual", None)
    try:
        config = CronConfig.model_validate(trigger.get("config") or {})
    except ValueError:
        return TriggerView(kind, "invalid cron trigger", None)
    next_fire = Schedule.of(config).next_after(now or datetime.now(UTC)) if active else None
    words = f"{cron_words(config.schedule)} ({config.timezone})"
    return TriggerView(kind, words, next_fire.astimezone(UTC) if next_fire else None)


# The run's timeline ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    step_id: str
    status: str
    attempt: int
    left: float  # percent of the timeline's width
    width: float
    seconds: float | None
    output: Any
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None


def timeline(steps: list[dict[str, Any]], run_started: datetime | None, now: datetime | None = None) -> list[Bar]:
    """One bar per step execution, placed by its start and length on the run's span (a Gantt chart).

    A step still running reaches to ``now``; a step without a start (not reached) has no bar width.
    """
    now = now or datetime.now(UTC)
    starts = [s["started_at"] for s in steps if s.get("started_at")]
    origin = min([*starts, run_started] if run_started else starts, default=now)
    ends = [s.get("finished_at") or now for s in steps if s.get("started_at")]
    end = max([*ends, origin], default=now)
    span = max((end - origin).total_seconds(), 0.001)
    bars = []
    for step in steps:
        started, finished = step.get("started_at"), step.get("finished_at")
        if started is None:
            left, width, seconds = 0.0, 0.0, None
        else:
            stop = finished or now
            left = (started - origin).total_seconds() / span * 100
            seconds = max((stop - started).total_seconds(), 0.0)
            width = max(seconds / span * 100, 0.5)
            left = min(left, 100 - width)
        bars.append(
            Bar(
                step_id=step["step_id"],
                status=str(step["status"]),
                attempt=int(step.get("attempt") or 1),
                left=round(left, 2),
                width=round(width, 2),
                seconds=seconds,
                output=step.get("output"),
                error=step.get("error"),
                started_at=started,
                finished_at=finished,
            )
        )
    return bars


# Versions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffLine:
    kind: str  # "add", "del", "hunk", "same"
    text: str


def version_body(row: dict[str, Any]) -> dict[str, Any]:
    """What a version defines, in the order a person reads it (the body that restores it)."""
    body: dict[str, Any] = {"name": row["name"]}
    if row.get("description") is not None:
        body["description"] = row["description"]
    body.update(trigger=row["trigger"], steps=row["steps"], settings=row["settings"])
    return body


def diff(old: dict[str, Any], new: dict[str, Any], old_label: str, new_label: str) -> list[DiffLine]:
    """A unified diff of two definitions' JSON, line by line."""
    lines = difflib.unified_diff(
        pretty_json(old).splitlines(), pretty_json(new).splitlines(), old_label, new_label, lineterm="", n=3
    )
    out = []
    for line in lines:
        if line.startswith(("---", "+++")):
            continue
        kind = {"+": "add", "-": "del", "@": "hunk"}.get(line[:1], "same")
        out.append(DiffLine(kind, line))
    return out


# Charts ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chart:
    """An inline SVG line chart: polyline points in a ``width`` x ``height`` box, and its scale."""

    width: int
    height: int
    series: list[tuple[str, str]]  # (css class, points)
    peak: int
    first: datetime | None
    last: datetime | None


def chart(history: list[QueueMinute], fields: list[str], width: int = 600, height: int = 120) -> Chart:
    """Lines of the given ``QueueMinute`` fields over the minutes, scaled to the highest value."""
    peak = max((int(getattr(m, f)) for m in history for f in fields), default=0)
    top = max(peak, 1)
    step = width / max(len(history) - 1, 1)
    series = []
    for name in fields:
        points = " ".join(
            f"{i * step:.1f},{height - int(getattr(m, name)) / top * (height - 4) - 2:.1f}"
            for i, m in enumerate(history)
        )
        series.append((name, points))
    return Chart(width, height, series, peak, history[0].at if history else None, history[-1].at if history else None)


# Examples for a new workflow --------------------------------------------------------------------

EXAMPLES: dict[str, tuple[str, dict[str, Any]]] = {
    "http": (
        "HTTP call",
        {
            "name": "fetch a page",
            "trigger": {"type": "manual"},
            "steps": [
                {"id": "fetch", "type": "http", "config": {"method": "GET", "url": "https://example.com/"}},
                {"id": "report", "type": "transform", "config": {"value": {"status": "{{ steps.fetch.status }}"}}},
            ],
        },
    ),
    "cron": (
        "Cron report",
        {
            "name": "weekday report",
            "trigger": {"type": "cron", "config": {"schedule": "0 9 * * 1-5", "timezone": "UTC"}},
            "steps": [
                {"id": "report", "type": "transform", "config": {"value": {"sentAt": "{{ trigger.scheduledAt }}"}}},
            ],
        },
    ),
    "webhook": (
        "Webhook → condition → HTTP",
        {
            "name": "forward large orders",
            "trigger": {"type": "webhook"},
            "steps": [
                {"id": "large", "type": "condition", "config": {"if": "trigger.amount > 100"}},
                {
                    "id": "notify",
                    "type": "http",
                    "config": {"method": "POST", "url": "https://example.com/orders", "json": "{{ trigger }}"},
                },
            ],
        },
    ),
}
