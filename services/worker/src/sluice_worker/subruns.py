"""Sub-workflow runs of ``workflow`` steps: started through the normal producer, read from PostgreSQL.

A child run is pinned, like any run, to its workflow's version current when it is queued.
"""

from __future__ import annotations

from typing import Any

import dramatiq

from sluice_common.db import Pool
from sluice_common.errors import ConflictError, NotFoundError, ValidationFailed
from sluice_common.runs import NewRun, enqueue_run
from sluice_common.settings import Settings
from sluice_worker.claims import Claimed
from sluice_worker.engine import ChildState, RunContext, StepFailed

CHILD_STATE_SQL = """
SELECT r.id, r.status, r.error,
       (SELECT s.output FROM run_steps s WHERE s.run_id = r.id AND s.status = 'succeeded'
        ORDER BY s.finished_at DESC, s.position DESC LIMIT 1) AS output
FROM runs r WHERE r.id = %s
"""

DEPTH_SQL = """
WITH RECURSIVE chain AS (
    SELECT id, parent_run_id, 1 AS depth FROM runs WHERE id = %(run)s
    UNION ALL
    SELECT r.id, r.parent_run_id, c.depth + 1 FROM runs r JOIN chain c ON r.id = c.parent_run_id
    WHERE c.depth <= %(limit)s
)
SELECT max(depth) AS depth FROM chain
"""


class PgSubRuns:
    """Child runs of ``workflow`` steps: started through the normal producer, read from PostgreSQL."""

    def __init__(self, settings: Settings, pool: Pool, broker: dramatiq.Broker, claimed: Claimed) -> None:
        self._settings = settings
        self._pool = pool
        self._broker = broker
        self._claimed = claimed

    def start(self, ctx: RunContext, step_id: str, workflow_id: str, trigger_data: Any) -> str:
        limit = self._settings.workflow_max_depth
        with self._pool.connection() as conn:
            row = conn.execute(DEPTH_SQL, {"run": ctx.run_id, "limit": limit}).fetchone()
        depth = int(row["depth"]) if row and row["depth"] else 1
        if depth >= limit:
            raise StepFailed(
                step_id,
                f"sub-workflows may nest {limit} levels deep (SLUICE_WORKFLOW_MAX_DEPTH); this run is at level {depth}",
                final=True,
            )
        try:
            child = enqueue_run(
                self._pool,
                self._broker,
                self._settings,
                NewRun(
                    workflow_id,
                    self._claimed.owner_id,
                    "workflow",
                    trigger_data,
                    priority=self._claimed.priority,
                    # The same attempt never starts a second child for one step (a redelivery, a
                    # hand-back at shutdown); a retry after a failure starts a fresh one.
                    idempotency_key=f"parent:{ctx.run_id}:{step_id}:{ctx.attempt}",
                    parent_run_id=ctx.run_id,
                ),
            )
        except NotFoundError:
            raise StepFailed(step_id, f"no workflow {workflow_id} of this owner", final=True) from None
        except (ConflictError, ValidationFailed) as exc:
            raise StepFailed(step_id, f"cannot start workflow {workflow_id}: {exc}", final=True) from None
        return str(child.run_id)

    def state(self, run_id: str) -> ChildState:
        with self._pool.connection() as conn:
            row = conn.execute(CHILD_STATE_SQL, (run_id,)).fetchone()
        if row is None:
            return ChildState(run_id, "cancelled", "the sub-workflow run no longer exists")
        return ChildState(str(row["id"]), row["status"], row["error"], row["output"])
