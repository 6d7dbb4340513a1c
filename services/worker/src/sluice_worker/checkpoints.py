"""Checkpoints of a run attempt: the engine's :class:`~sluice_worker.engine.StepStore` on PostgreSQL."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any, Literal

from psycopg.types.json import Jsonb

from sluice_common import runstate
from sluice_common.db import Pool
from sluice_worker.claims import Claimed


class PgStepStore:
    """Checkpoints of one run attempt in ``run_steps``; each write also reads the cancel flag."""

    def __init__(self, pool: Pool, claimed: Claimed, stopping: threading.Event) -> None:
        self._pool = pool
        self._claimed = claimed
        self._stopping = stopping
        self._cancel = False
        self._last = len(claimed.steps or []) - 1
        # The last step's checkpoint is written by the run's finishing statement (one round
        # trip less per run); if the worker dies in between, that step runs again, as it would
        # had the worker died during it.
        self.final_step: tuple[str, int, Any, datetime] | None = None

    def completed(self) -> dict[str, Any]:
        return self._claimed.done_steps

    def waiting(self) -> dict[str, Any]:
        return self._claimed.waiting_steps

    def _write(
        self, step_id: str, position: int, status: str, output: Any, error: str | None, started: datetime
    ) -> None:
        with self._pool.connection() as conn:
            row = conn.execute(
                runstate.CHECKPOINT,
                {
                    "run": self._claimed.run_id,
                    "claim": self._claimed.claim_id,
                    "step": step_id,
                    "pos": position,
                    "status": status,
                    "attempt": self._claimed.attempt,
                    "output": Jsonb(output) if output is not None else None,
                    "error": error,
                    "started": started,
                },
            ).fetchone()
        # A refused checkpoint (the claim was lost: another execution holds the run) stops this
        # execution like a cancel; its finish is refused too, and it is recorded as lost.
        self._cancel = bool(row is None or row["cancel_requested"] or not row["held"])

    def succeeded(self, step_id: str, position: int, output: Any, started_at: datetime) -> None:
        # The engine has already capped the output (SLUICE_STEP_OUTPUT_MAX_BYTES) and made it JSON.
        if position == self._last:
            self.final_step = (step_id, position, output, started_at)
            return
        self._write(step_id, position, "succeeded", output, None, started_at)

    def parked(self, step_id: str, position: int, output: Any, started_at: datetime) -> None:
        # Written at once even for the last step: the resumed attempt must find it.
        self._write(step_id, position, "waiting", output, None, started_at)

    def failed(self, step_id: str, position: int, error: str, started_at: datetime) -> None:
        self._write(step_id, position, "failed", None, error[:10_000], started_at)

    def starting(self, step_id: str, position: int) -> None:
        return None

    def interruption(self) -> Literal["cancelled", "shutdown"] | None:
        if self._cancel:
            return "cancelled"
        if self._stopping.is_set():
            return "shutdown"
        return None
