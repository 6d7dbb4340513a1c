"""What a step's run function gets (:class:`StepInput`), and what it may return or raise besides its
output: :class:`Park` to wait without holding the thread, :class:`StepFailed` to fail the step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sluice_common.errors import StepFailure

if TYPE_CHECKING:
    from sluice_worker.engine import RunContext, Runtime, Scope


class StepFailed(StepFailure):
    """A step failed; the attempt fails and may be retried (``final``: it may not)."""

    def __init__(self, step_id: str, message: str, *, final: bool = False) -> None:
        self.step_id = step_id
        self.final = final
        super().__init__(f"step {step_id!r}: {message}")


@dataclass(frozen=True)
class Park:
    """A step's answer meaning: record me as waiting and end the attempt without using it."""

    output: Any
    resume_at: datetime | None = None
    waiting_for: str | None = None


@dataclass
class StepInput:
    """One step about to run: its rendered config and what it may use."""

    step_id: str
    position: int
    config: Any  # the validated config model
    scope: Scope
    ctx: RunContext
    runtime: Runtime
    timeout: float  # seconds, already bounded by the run deadline
    waiting: Any  # the step's recorded waiting output, when it parked before


Run = Callable[[StepInput], Any]
"""A step type's run function: the step's output (JSON data), or a :class:`Park`; raises
:class:`StepFailed` (any other exception fails the step too, as a bug)."""
