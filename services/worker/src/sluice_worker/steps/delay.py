"""The ``delay`` step: parks the run until its time instead of sleeping (see ``docs/engine.md``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sluice_common.workflow import DelayConfig, parse_time
from sluice_worker.steps.base import Park, StepFailed, StepInput


def run(step: StepInput) -> Any:
    config: DelayConfig = step.config
    now = datetime.now(UTC)
    if step.waiting is not None:
        until = parse_time(step.waiting["until"])
    elif config.seconds is not None:
        until = now + timedelta(seconds=config.seconds)
    else:
        assert config.until is not None
        try:
            until = parse_time(config.until)
        except ValueError as exc:
            raise StepFailed(step.step_id, f"config.until: {exc}", final=True) from None
    if until <= now:
        return {"waitedUntil": until.isoformat()}
    return Park({"until": until.isoformat()}, resume_at=until)
