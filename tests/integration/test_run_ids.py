"""Runs get ids in time order (UUIDv7) however they are inserted: alone, in a batch of the API's
group commit, and by the column default (migration 0018) for rows written any other way."""

from __future__ import annotations

import time
import uuid

from sluice_common.db import DictConnection
from sluice_common.runs import NewRun, insert_many, insert_run
from tests.integration.conftest import Pipeline

NOOP = [{"id": "a", "type": "transform", "config": {"value": 1}}]


def _millis(conn: DictConnection, run_id: uuid.UUID) -> tuple[int, int]:
    """The id's time and the run's queued_at, in Unix milliseconds."""
    row = conn.execute(
        "SELECT (extract(epoch FROM queued_at) * 1000)::bigint AS queued FROM runs WHERE id = %s", (run_id,)
    ).fetchone()
    assert row is not None
    return run_id.int >> 80, row["queued"]


def test_every_way_a_run_is_inserted_gives_it_a_time_ordered_id(pipeline: Pipeline) -> None:
    owner = pipeline.user()
    wf = pipeline.workflow(owner, NOOP)
    with pipeline.pool.connection() as conn:
        alone = insert_run(conn, pipeline.settings, NewRun(wf, owner)).run_id
        time.sleep(0.002)  # a later millisecond, so that the order of the ids is the order made
        batch = insert_many(conn, pipeline.settings, [NewRun(wf, owner, trigger_data={"n": n}) for n in range(3)])
        time.sleep(0.002)
        row = conn.execute(
            "INSERT INTO runs (workflow_id, owner_id, workflow_version, trigger_type, status, max_attempts,"
            " dispatch_at) VALUES (%s, %s, 1, 'manual', 'queued', 1, now()) RETURNING id",
            (wf, owner),
        ).fetchone()
        assert row is not None
        by_default = row["id"]
        made = [alone, *[r.run_id for r in batch if r is not None], by_default]
        assert len(made) == 5
        for run_id in made:
            run_id = uuid.UUID(str(run_id))
            assert (run_id.version, run_id.variant) == (7, uuid.RFC_4122)
            id_ms, queued_ms = _millis(conn, run_id)
            # The id's time is when it was made: by the service just before its insert, or by the
            # database during it (its transaction's start is queued_at).
            assert queued_ms - 1_000 <= id_ms <= queued_ms + 1_000
        order = conn.execute("SELECT id FROM runs WHERE workflow_id = %s ORDER BY id", (wf,)).fetchall()
    # Made in different milliseconds, they sort in that order (the batch's own ids may share one,
    # so only its place between the others is checked).
    ids = [uuid.UUID(str(r["id"])) for r in order]
    assert ids[0] == uuid.UUID(str(alone))
    assert ids[-1] == uuid.UUID(str(by_default))
