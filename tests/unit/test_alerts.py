"""The alert webhook's logic without servers: each rule's state machine, claims, the outbox, the posting."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from sluice_common.settings import load_settings
from sluice_scheduler.alerting import AlertJob, AlertState, Change, next_state, notice_body, post_json
from sluice_scheduler.alerts import RULES, AlertRule
from sluice_scheduler.maintenance import maintenance_jobs
from tests.httpserver import running

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
BACKLOG = next(r for r in RULES if r.name == "SluiceQueueBacklog")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# The state machine -------------------------------------------------------------------------------


def test_the_rules_are_the_prometheus_rules_postgresql_can_answer() -> None:
    assert {r.name: (r.severity, r.threshold, r.for_seconds) for r in RULES} == {
        "SluiceQueueBacklog": ("warning", 50, 300),
        "SluiceHighFailureRate": ("warning", 0.1, 300),
        "SluiceNoWorkersWhileRunsWait": ("critical", 0, 120),
        "SluiceRunsStuckPastLease": ("critical", 0, 300),
    }


def test_pending_then_firing_once_the_for_duration_has_passed() -> None:
    inactive = AlertState()
    assert next_state(BACKLOG, inactive, 50, at(0)) is None  # the threshold itself is not above it
    assert next_state(BACKLOG, inactive, None, at(0)) is None  # no data: inactive

    pending = next_state(BACKLOG, inactive, 51, at(0))
    assert pending is not None
    assert pending.notice is None
    assert pending.new == AlertState("pending", 1, at(0))

    assert next_state(BACKLOG, pending.new, 80, at(299)) is None  # still pending: nothing to write
    firing = next_state(BACKLOG, pending.new, 80, at(300))
    assert firing is not None
    assert firing.notice == "firing"
    assert firing.new == AlertState("firing", 2, at(0), at(300), 80)

    assert next_state(BACKLOG, firing.new, 200, at(900)) is None  # firing goes on: posted once
    resolved = next_state(BACKLOG, firing.new, 3, at(960))
    assert resolved is not None
    assert resolved.notice == "resolved"
    assert resolved.new == AlertState("inactive", 3)


def test_pending_that_clears_before_its_for_duration_never_posts() -> None:
    pending = next_state(BACKLOG, AlertState(), 51, at(0))
    assert pending is not None
    cleared = next_state(BACKLOG, pending.new, 10, at(100))
    assert cleared is not None
    assert cleared.notice is None
    assert cleared.new.state == "inactive"
    # Active again: the for clock starts over.
    again = next_state(BACKLOG, cleared.new, 51, at(120))
    assert again is not None
    assert again.new.active_since == at(120)
    assert next_state(BACKLOG, again.new, 51, at(400)) is None


def test_a_rule_without_a_for_duration_fires_at_once() -> None:
    rule = replace(BACKLOG, for_seconds=0)
    change = next_state(rule, AlertState(), 51, at(0))
    assert change is not None
    assert change.notice == "firing"
    assert change.new.state == "firing"


def test_the_body_is_alertmanagers_webhook_shape() -> None:
    firing = Change(AlertState("pending", 1, at(0)), AlertState("firing", 2, at(0), at(300), 72), "firing", 72)
    body = notice_body(BACKLOG, firing, at(300), external_url="https://sluice.example")
    labels = {"alertname": "SluiceQueueBacklog", "severity": "warning", "service": "sluice"}
    assert body["version"] == "4"
    assert body["status"] == "firing"
    assert body["commonLabels"] == labels
    assert body["groupLabels"] == {"alertname": "SluiceQueueBacklog"}
    assert body["externalURL"] == "https://sluice.example"
    [alert] = body["alerts"]
    assert alert["status"] == "firing"
    assert alert["labels"] == labels
    assert alert["annotations"]["summary"] == "72 runs are waiting for a worker"
    assert alert["startsAt"] == "2025-01-01T12:05:00.000Z"
    assert alert["endsAt"] == "0001-01-01T00:00:00Z"
    assert alert["value"] == 72
    json.dumps(body)  # a JSON document as it is

    resolved = Change(firing.new, AlertState("inactive", 3), "resolved", 4)
    body = notice_body(BACKLOG, resolved, at(600))
    [alert] = body["alerts"]
    assert (body["status"], alert["status"]) == ("resolved", "resolved")
    assert alert["startsAt"] == "2025-01-01T12:05:00.000Z"
    assert alert["endsAt"] == "2025-01-01T12:10:00.000Z"
    assert alert["annotations"]["summary"] == "72 runs are waiting for a worker"  # as it fired
    assert alert["value"] == 4


def test_annotations_render_each_rules_value() -> None:
    by_name = {r.name: r for r in RULES}
    assert by_name["SluiceHighFailureRate"].annotations(0.125)["summary"] == "12% of runs are failing"
    assert by_name["SluiceRunsStuckPastLease"].annotations(3)["summary"] == "3 runs are stuck past their lease"
    assert by_name["SluiceNoWorkersWhileRunsWait"].annotations(7)["description"].startswith("7 runs are ready")


# Evaluators over a shared store --------------------------------------------------------------------


class MemoryStore:
    """The PostgreSQL store's contract in memory: versioned claims, an ordered outbox, a clock."""

    def __init__(self) -> None:
        self.clock = T0
        self.values: dict[str, float | None] = {}
        self.states: dict[str, AlertState] = {}
        self.notices: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def load(self, names: Iterable[str]) -> dict[str, AlertState]:
        with self.lock:
            for name in names:
                self.states.setdefault(name, AlertState())
            return dict(self.states)

    def measure(self, rules: Sequence[AlertRule]) -> tuple[datetime, list[tuple[AlertRule, float | None]]]:
        return self.clock, [(r, self.values.get(r.name)) for r in rules]

    def apply(self, name: str, change: Change, body: dict[str, Any] | None) -> bool:
        with self.lock:
            if self.states[name].version != change.old.version:
                return False
            self.states[name] = change.new
            if change.notice is not None:
                assert body is not None
                self.notices.append(
                    {"id": len(self.notices) + 1, "body": body, "attempts": 0, "next": self.clock, "done": False}
                )
            return True

    def next_notice(self) -> tuple[int, dict[str, Any], int] | None:
        with self.lock:
            first = next((n for n in self.notices if not n["done"]), None)
            if first is None or first["next"] > self.clock:
                return None
            first["attempts"] += 1
            first["next"] = self.clock + timedelta(seconds=60)
            return first["id"], first["body"], first["attempts"]

    def delivered(self, notice_id: int) -> None:
        self.notices[notice_id - 1]["done"] = True

    def failed(self, notice_id: int, error: str, retry_in: float) -> None:
        self.notices[notice_id - 1]["next"] = self.clock + timedelta(seconds=retry_in)

    def prune(self) -> None:
        pass


class Receiver:
    """Records what is posted; fails the first ``fail`` posts."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.calls = 0
        self.received: list[dict[str, Any]] = []

    def __call__(self, url: str, body: dict[str, Any], timeout: float) -> None:
        self.calls += 1
        if self.calls <= self.fail:
            raise OSError("connection refused")
        self.received.append(body)

    def statuses(self) -> list[tuple[str, str]]:
        return [(b["groupLabels"]["alertname"], b["status"]) for b in self.received]


def job(store: MemoryStore, receiver: Receiver, **options: Any) -> AlertJob:
    return AlertJob(store, "http://receiver.test/hook", post=receiver, **options)


def test_each_change_is_posted_once_by_whichever_evaluator_claims_it() -> None:
    store = MemoryStore()
    receiver = Receiver()
    first, second = job(store, receiver), job(store, receiver)  # two leaders for a moment, or a handover
    store.values["SluiceQueueBacklog"] = 51
    first()
    second()
    assert receiver.received == []  # pending
    store.clock = at(301)
    first()
    second()
    store.clock = at(330)
    second()
    first()
    assert receiver.statuses() == [("SluiceQueueBacklog", "firing")]
    store.values["SluiceQueueBacklog"] = 0
    store.clock = at(400)
    second()
    first()
    second()
    assert receiver.statuses() == [("SluiceQueueBacklog", "firing"), ("SluiceQueueBacklog", "resolved")]


def test_a_stale_evaluator_loses_the_claim() -> None:
    store = MemoryStore()
    store.values["SluiceQueueBacklog"] = 51
    old = store.load(["SluiceQueueBacklog"])["SluiceQueueBacklog"]
    change = next_state(BACKLOG, old, 51, T0)
    assert change is not None
    assert store.apply("SluiceQueueBacklog", change, None)
    assert not store.apply("SluiceQueueBacklog", change, None)  # read the same version: too late


def test_a_failed_post_is_retried_with_backoff_and_delivered_once() -> None:
    store = MemoryStore()
    receiver = Receiver(fail=2)
    evaluator = job(store, receiver, rules=[replace(BACKLOG, for_seconds=0)], backoff=(10, 600))
    store.values["SluiceQueueBacklog"] = 60
    evaluator()
    assert (receiver.calls, receiver.received) == (1, [])
    store.clock = at(5)
    evaluator()
    assert receiver.calls == 1  # the backoff (10 s) has not passed
    store.clock = at(10)
    evaluator()
    assert receiver.calls == 2  # failed again: next in 20 s
    store.clock = at(29)
    evaluator()
    assert receiver.calls == 2
    store.clock = at(30)
    evaluator()
    assert receiver.calls == 3
    assert receiver.statuses() == [("SluiceQueueBacklog", "firing")]
    for t in (45, 60, 600):
        store.clock = at(t)
        evaluator()
    assert receiver.calls == 3


def test_notices_go_in_order_and_a_failure_holds_the_later_ones() -> None:
    store = MemoryStore()
    receiver = Receiver(fail=1)
    evaluator = job(store, receiver, rules=[replace(BACKLOG, for_seconds=0)], backoff=(10, 600))
    store.values["SluiceQueueBacklog"] = 60
    evaluator()  # firing: the post fails
    store.values["SluiceQueueBacklog"] = 0
    store.clock = at(1)
    evaluator()  # resolved, but waits behind the firing notice
    assert receiver.received == []
    store.clock = at(10)
    evaluator()
    assert receiver.statuses() == [("SluiceQueueBacklog", "firing"), ("SluiceQueueBacklog", "resolved")]


def test_posting_stops_when_the_turns_budget_is_spent() -> None:
    store = MemoryStore()
    receiver = Receiver()
    evaluator = job(store, receiver, rules=[replace(r, for_seconds=0) for r in RULES], budget=0)
    store.values.update(SluiceQueueBacklog=60, SluiceRunsStuckPastLease=2)
    evaluator()
    assert receiver.received == []  # no time left to post: the next turn does
    assert [n["done"] for n in store.notices] == [False, False]


def test_a_broken_measure_keeps_the_state() -> None:
    store = MemoryStore()
    receiver = Receiver()
    evaluator = job(store, receiver, rules=[replace(BACKLOG, for_seconds=0)])
    store.values["SluiceQueueBacklog"] = 60
    evaluator()
    # The store leaves out a rule whose query failed: not a reading of "no data", so no resolve.
    store.measure = lambda rules: (store.clock, [])  # type: ignore[method-assign]
    evaluator()
    assert receiver.statuses() == [("SluiceQueueBacklog", "firing")]
    assert store.states["SluiceQueueBacklog"].state == "firing"


# Wiring and HTTP ------------------------------------------------------------------------------------


def test_the_alerts_job_runs_only_when_the_url_is_set() -> None:
    def names(env: dict[str, str]) -> list[str]:
        return [j.name for j in maintenance_jobs(load_settings(env), None, None)]  # type: ignore[arg-type]

    assert names({}) == ["recover", "reconcile", "fold", "prune"]
    jobs = maintenance_jobs(
        load_settings({"SLUICE_ALERT_WEBHOOK_URL": "https://h.example/x", "SLUICE_ALERT_INTERVAL_SECONDS": "20"}),
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
    )
    assert [(j.name, j.interval) for j in jobs][-1] == ("alerts", 20)


class _Hook(BaseHTTPRequestHandler):
    server: _HookServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append((self.path, dict(self.headers), json.loads(body)))
        status = self.server.status
        self.send_response(status)
        if status in (301, 302, 303):
            self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self.server.seen.append((self.path, dict(self.headers), None))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _HookServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, status: int) -> None:
        super().__init__(("127.0.0.1", 0), _Hook)
        self.status = status
        self.seen: list[tuple[str, dict[str, str], Any]] = []


@contextmanager
def hook(status: int = 200) -> Iterator[_HookServer]:
    with running(_HookServer(status)) as server:
        yield server


def test_post_json_sends_json_and_basic_auth_from_the_url() -> None:
    with hook() as server:
        port = server.server_address[1]
        post_json(f"http://alert%40ops:s%3Acret@127.0.0.1:{port}/hook?x=1", {"a": 1})
    [(path, headers, body)] = server.seen
    assert (path, body) == ("/hook?x=1", {"a": 1})
    assert headers["Content-Type"] == "application/json"
    assert base64.b64decode(headers["Authorization"].removeprefix("Basic ")) == b"alert@ops:s:cret"


@pytest.mark.parametrize("status", [500, 404, 302])
def test_post_json_fails_on_an_error_or_a_redirect(status: int) -> None:
    with hook(status) as server, pytest.raises(OSError, match=str(status)):
        post_json(f"http://127.0.0.1:{server.server_address[1]}/hook", {"a": 1})
    assert [s[0] for s in server.seen] == ["/hook"]  # the redirect was not followed


def test_post_json_gives_up_after_its_timeout() -> None:
    with hook() as server:
        server.RequestHandlerClass = _Silent  # type: ignore[assignment]
        with pytest.raises(OSError, match="timed out"):
            post_json(f"http://127.0.0.1:{server.server_address[1]}/hook", {"a": 1}, timeout=0.3)


class _Silent(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        threading.Event().wait(2)
