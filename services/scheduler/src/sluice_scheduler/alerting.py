"""The alert webhook: the leader evaluates the rules of :mod:`sluice_scheduler.alerts` and posts each change.

:class:`AlertJob` is a maintenance job (see :mod:`sluice_scheduler.maintenance`): every
``SLUICE_ALERT_INTERVAL_SECONDS`` while this replica leads, and only when
``SLUICE_ALERT_WEBHOOK_URL`` is set, it measures every rule, moves each alert through
inactive → pending → firing → inactive (:func:`next_state`, as Prometheus does: pending while the
condition holds for less than the rule's ``for``), and posts ``firing`` and ``resolved`` once each.

Once per change, across failovers: states live in PostgreSQL (``alert_states``, migration 0013). A
change is claimed with an UPDATE that matches the version that was read, and its notice is written
to an outbox (``alert_notices``) in the same transaction; notices are then posted in order, each
attempt claimed first, until the receiver answers 2xx. A failed post is retried on later
evaluations with a growing backoff. Posting stops at the first failure, and no post starts once a
turn has spent its budget on posting: a dead receiver holds the maintenance loop (recovery,
reconciliation) one timeout at most per evaluation, a slow one about two. A leader that crashes
mid-post leaves its attempt held; the next leader posts it again once the hold lapses (the one
case of a notice posted twice).

The body follows Alertmanager's webhook (``version`` 4), so receivers written for it work, with the
measured value added (``value``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

from psycopg.types.json import Jsonb

from sluice_common.db import Pool
from sluice_scheduler.alerts import RULES, AlertRule

log = logging.getLogger(__name__)

State = Literal["inactive", "pending", "firing"]
Notice = Literal["firing", "resolved"]

# A receiver that does not answer within this long is a failed attempt, retried later: the
# maintenance loop (recovery, reconciliation) waits while a post is under way.
POST_TIMEOUT_SECONDS = 5.0
# No further notice is started once this much of a turn went on posting.
POST_BUDGET_SECONDS = 5.0
# An attempt under way holds its notice this long: a poster that crashed mid-post is retried after it.
ATTEMPT_HOLD_SECONDS = 60.0
# Retries after a failed post wait 10 s, 20 s, 40 s ... up to 10 minutes.
BACKOFF_MIN_SECONDS = 10.0
BACKOFF_MAX_SECONDS = 600.0
# Delivered notices are kept this long (what was sent, and when), then deleted.
KEEP_DELIVERED_DAYS = 7
# Alertmanager's "no end yet" in a firing alert's endsAt.
_NO_END = "0001-01-01T00:00:00Z"


@dataclass(frozen=True)
class AlertState:
    state: State = "inactive"
    version: int = 0
    active_since: datetime | None = None  # the condition has held since (pending and firing)
    fired_at: datetime | None = None
    fired_value: float | None = None


@dataclass(frozen=True)
class Change:
    old: AlertState
    new: AlertState
    notice: Notice | None  # what to post: a start or an end of firing; None for pending moves
    value: float | None


def next_state(rule: AlertRule, old: AlertState, value: float | None, now: datetime) -> Change | None:
    """The change one reading makes to an alert, or None when it stays as it is."""
    active = rule.active(value)
    after = old.version + 1
    if old.state == "inactive":
        if not active:
            return None
        if rule.for_seconds <= 0:
            return Change(old, AlertState("firing", after, now, now, value), "firing", value)
        return Change(old, AlertState("pending", after, now), None, value)
    if old.state == "pending":
        if not active:
            return Change(old, AlertState("inactive", after), None, value)
        since = old.active_since or now
        if now - since >= timedelta(seconds=rule.for_seconds):
            return Change(old, AlertState("firing", after, since, now, value), "firing", value)
        return None
    if active:
        return None
    return Change(old, AlertState("inactive", after), "resolved", value)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def notice_body(rule: AlertRule, change: Change, now: datetime, *, external_url: str = "") -> dict[str, Any]:
    """The posted document: Alertmanager's webhook shape, one alert, plus its ``value``."""
    assert change.notice is not None
    fired = change.new if change.notice == "firing" else change.old
    labels = {"alertname": rule.name, "severity": rule.severity, "service": "sluice"}
    # A resolved alert keeps the annotations it fired with (as Alertmanager resends them).
    annotations = rule.annotations(fired.fired_value if change.notice == "resolved" else change.value)
    fingerprint = hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]
    alert = {
        "status": change.notice,
        "labels": labels,
        "annotations": annotations,
        "startsAt": _rfc3339(fired.fired_at or now),
        "endsAt": _NO_END if change.notice == "firing" else _rfc3339(now),
        "generatorURL": "",
        "fingerprint": fingerprint,
        "value": change.value,
    }
    return {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="{rule.name}"}}',
        "truncatedAlerts": 0,
        "status": change.notice,
        "receiver": "sluice",
        "groupLabels": {"alertname": rule.name},
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": external_url,
        "alerts": [alert],
    }


# PostgreSQL: states and the outbox -----------------------------------------------------------------


class Store(Protocol):
    """Where alert states and notices live: :class:`AlertStore` (PostgreSQL), or a test's double."""

    def load(self, names: Iterable[str]) -> dict[str, AlertState]: ...

    def measure(self, rules: Sequence[AlertRule]) -> tuple[datetime, list[tuple[AlertRule, float | None]]]: ...

    def apply(self, name: str, change: Change, body: dict[str, Any] | None) -> bool: ...

    def next_notice(self) -> tuple[int, dict[str, Any], int] | None: ...

    def delivered(self, notice_id: int) -> None: ...

    def failed(self, notice_id: int, error: str, retry_in: float) -> None: ...

    def prune(self) -> None: ...


class AlertStore:
    """The alert states and the notices to post, in PostgreSQL (every method is one short transaction)."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    def measure(self, rules: Sequence[AlertRule]) -> tuple[datetime, list[tuple[AlertRule, float | None]]]:
        """The database's time and each rule's reading; a rule whose query fails is left out.

        The time is the database's, so that replicas on hosts with drifting clocks agree on ``for``.
        A rule whose query fails keeps its state: a broken query must not resolve an alert.
        """
        readings: list[tuple[AlertRule, float | None]] = []
        with self._pool.connection() as conn:
            row = conn.execute("SELECT clock_timestamp() AS now").fetchone()
            assert row is not None
            for rule in rules:
                try:
                    readings.append((rule, rule.measure(conn)))
                except Exception:
                    log.warning("alert %s: cannot measure it; its state is kept", rule.name, exc_info=True)
        now: datetime = row["now"]
        return now, readings

    def load(self, names: Iterable[str]) -> dict[str, AlertState]:
        """Every rule's state (rows made on first sight, inactive)."""
        names = list(names)
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO alert_states (alertname) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING", (names,)
            )
            rows = conn.execute(
                "SELECT alertname, state, version, active_since, fired_at, fired_value FROM alert_states "
                "WHERE alertname = ANY(%s)",
                (names,),
            ).fetchall()
        return {
            r["alertname"]: AlertState(r["state"], r["version"], r["active_since"], r["fired_at"], r["fired_value"])
            for r in rows
        }

    def apply(self, name: str, change: Change, body: dict[str, Any] | None) -> bool:
        """Claim ``change`` (and record its notice): False when another evaluator made a change first."""
        new = change.new
        with self._pool.connection() as conn, conn.transaction():
            claimed = conn.execute(
                """
                UPDATE alert_states SET state = %(state)s, version = %(version)s, active_since = %(since)s,
                       fired_at = %(fired)s, fired_value = %(value)s, updated_at = now()
                WHERE alertname = %(name)s AND version = %(old)s
                RETURNING alertname
                """,
                {
                    "name": name,
                    "old": change.old.version,
                    "state": new.state,
                    "version": new.version,
                    "since": new.active_since,
                    "fired": new.fired_at,
                    "value": new.fired_value,
                },
            ).fetchone()
            if claimed is None:
                return False
            if change.notice is not None and body is not None:
                conn.execute(
                    "INSERT INTO alert_notices (alertname, status, body) VALUES (%s, %s, %s)",
                    (name, change.notice, Jsonb(body)),
                )
        return True

    def next_notice(self) -> tuple[int, dict[str, Any], int] | None:
        """Take the oldest undelivered notice if it is due: ``(id, body, attempt)``, or None.

        Only the oldest: a later notice waits for it, so a receiver never sees an alert resolve
        before it saw it fire. Taking it pushes its next attempt away (the hold), so a second
        evaluator does not post it at the same time.
        """
        with self._pool.connection() as conn:
            row = conn.execute(
                """
                UPDATE alert_notices SET attempts = attempts + 1,
                       next_attempt_at = now() + make_interval(secs => %s)
                WHERE id = (SELECT id FROM alert_notices WHERE delivered_at IS NULL ORDER BY id LIMIT 1)
                  AND next_attempt_at <= now()
                RETURNING id, body, attempts
                """,
                (ATTEMPT_HOLD_SECONDS,),
            ).fetchone()
        return None if row is None else (row["id"], row["body"], row["attempts"])

    def delivered(self, notice_id: int) -> None:
        with self._pool.connection() as conn:
            conn.execute("UPDATE alert_notices SET delivered_at = now(), last_error = NULL WHERE id = %s", (notice_id,))

    def failed(self, notice_id: int, error: str, retry_in: float) -> None:
        with self._pool.connection() as conn:
            conn.execute(
                "UPDATE alert_notices SET last_error = %s, next_attempt_at = now() + make_interval(secs => %s) "
                "WHERE id = %s",
                (error[:1000], retry_in, notice_id),
            )

    def prune(self) -> None:
        with self._pool.connection() as conn:
            conn.execute(
                "DELETE FROM alert_notices WHERE delivered_at < now() - make_interval(days => %s)",
                (KEEP_DELIVERED_DAYS,),
            )


# HTTP -----------------------------------------------------------------------------------------------


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # urllib would follow a 301-303 with a GET without the body and call that a success: a
    # redirect is a failed post (fix the URL), so it surfaces as an HTTPError instead.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def post_json(url: str, body: dict[str, Any], timeout: float = POST_TIMEOUT_SECONDS) -> None:
    """POST ``body`` as JSON; raise unless the receiver answers 2xx within ``timeout`` seconds.

    The scheduler depends on sluice-common alone, which brings no HTTP client (httpx is the
    worker's and the API's): the standard library's urllib does the one POST this needs.
    Credentials in the URL (``https://user:pass@host/...``) are sent as basic authentication.
    """
    parts = urlsplit(url)
    headers = {"Content-Type": "application/json", "User-Agent": "sluice-scheduler"}
    if parts.username is not None:
        token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        host = parts.hostname or ""
        netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
        url = urlunsplit(parts._replace(netloc=netloc))
    # The URL's scheme was checked with the settings (http or https only), hence the noqa.
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")  # noqa: S310
    opener = urllib.request.build_opener(_NoRedirects)
    with opener.open(request, timeout=timeout) as response:
        response.read(64 * 1024)


def _describe(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return f"{type(exc.reason).__name__}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


# The job ---------------------------------------------------------------------------------------------


class AlertJob:
    """One evaluation of every rule and the posting of what changed (a maintenance job's action).

    ``rules``, ``post`` and the timings are parameters so tests can shorten or replace them; the
    service uses the defaults.
    """

    def __init__(
        self,
        store: Store,
        url: str,
        *,
        rules: Sequence[AlertRule] = RULES,
        external_url: str = "",
        post: Callable[[str, dict[str, Any], float], None] = post_json,
        timeout: float = POST_TIMEOUT_SECONDS,
        budget: float = POST_BUDGET_SECONDS,
        backoff: tuple[float, float] = (BACKOFF_MIN_SECONDS, BACKOFF_MAX_SECONDS),
    ) -> None:
        self._store = store
        self._url = url
        self._rules = tuple(rules)
        self._external_url = external_url
        self._post = post
        self._timeout = timeout
        self._budget = budget
        self._backoff = backoff

    def __call__(self) -> None:
        self.evaluate()
        self.deliver()

    def evaluate(self) -> list[tuple[str, Change]]:
        """Measure every rule and claim the changes; return those claimed (by this evaluator)."""
        states = self._store.load(r.name for r in self._rules)
        now, readings = self._store.measure(self._rules)
        claimed: list[tuple[str, Change]] = []
        for rule, value in readings:
            change = next_state(rule, states.get(rule.name, AlertState()), value, now)
            if change is None:
                continue
            body = None
            if change.notice is not None:
                body = notice_body(rule, change, now, external_url=self._external_url)
            if not self._store.apply(rule.name, change, body):
                log.debug("alert %s changed under us (another leader); skipped", rule.name)
                continue
            claimed.append((rule.name, change))
            if change.notice == "firing":
                log.warning("alert %s firing (value %s)", rule.name, change.value)
            elif change.notice == "resolved":
                log.info("alert %s resolved (value %s)", rule.name, change.value)
            else:
                log.debug("alert %s is %s (value %s)", rule.name, change.new.state, change.value)
        return claimed

    def deliver(self) -> int:
        """Post the due notices in order until one fails or the time budget is spent; return how many went."""
        sent = 0
        started = time.monotonic()
        while time.monotonic() - started < self._budget:
            taken = self._store.next_notice()
            if taken is None:
                break
            notice_id, body, attempt = taken
            try:
                self._post(self._url, body, self._timeout)
            except Exception as exc:
                # The exponent is capped: a receiver down for days counts thousands of attempts.
                retry_in = min(self._backoff[1], self._backoff[0] * 2 ** min(attempt - 1, 30))
                log.warning(
                    "alert webhook: notice %d (%s %s) not delivered (attempt %d: %s); retrying in %.0f s",
                    notice_id,
                    body.get("groupLabels", {}).get("alertname"),
                    body.get("status"),
                    attempt,
                    _describe(exc),
                    retry_in,
                )
                self._store.failed(notice_id, _describe(exc), retry_in)
                break
            self._store.delivered(notice_id)
            sent += 1
        self._store.prune()
        return sent
