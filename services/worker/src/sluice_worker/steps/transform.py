"""The ``transform`` step: its output is its ``value``, templates rendered."""

from __future__ import annotations

from typing import Any

from sluice_common.workflow import TransformConfig
from sluice_worker.steps.base import StepInput


def run(step: StepInput) -> Any:
    config: TransformConfig = step.config
    return config.value
