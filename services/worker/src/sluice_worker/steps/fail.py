"""The ``fail`` step: fails the run with its message, finally (retrying would fail again)."""

from __future__ import annotations

from typing import Any

from sluice_common.workflow import FailConfig
from sluice_worker.steps.base import StepFailed, StepInput


def run(step: StepInput) -> Any:
    config: FailConfig = step.config
    raise StepFailed(step.step_id, config.message, final=True)
