"""The exception tree and the one conversion of pydantic errors into field problems."""

from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, Field, ValidationError, model_validator

from sluice_common.errors import FieldProblem, SluiceError, StepFailure, field_problems, json_path
from sluice_common.steps import StepError
from sluice_worker.expressions import ExpressionError
from sluice_worker.safehttp import HttpRefused
from sluice_worker.steps.base import StepFailed


class Cron(BaseModel):
    type: Literal["cron"]
    schedule: str


class Manual(BaseModel):
    type: Literal["manual"]


class Item(BaseModel):
    n: Annotated[int, Field(ge=0)]


class Sample(BaseModel):
    items: list[Item] = []
    headers: dict[str, int] = {}
    trigger: Annotated[Cron | Manual, Field(discriminator="type")] | None = None
    low: int = 0
    high: int = 0

    @model_validator(mode="after")
    def _order(self) -> "Sample":
        if self.low > self.high:
            raise ValueError("low must not exceed high")
        return self


def problems(data: Any, base: str = "$", **kwargs: Any) -> list[FieldProblem]:
    with pytest.raises(ValidationError) as info:
        Sample.model_validate(data)
    return field_problems(info.value, base, **kwargs)


def test_every_error_becomes_a_problem_at_its_json_path() -> None:
    found = problems({"items": [{"n": 1}, {"n": -1}], "headers": {"X-Api-Key": "x"}})
    assert [p.path for p in found] == ["$.items[1].n", "$.headers['X-Api-Key']"]
    assert found[0].message == "Input should be greater than or equal to 0"


def test_a_model_level_error_is_at_the_base_without_pydantics_prefix() -> None:
    assert problems({"low": 2, "high": 1}, "$.steps[3].config") == [
        FieldProblem("$.steps[3].config", "low must not exceed high")
    ]


def test_discriminator_tags_are_left_out_when_named() -> None:
    assert [p.path for p in problems({"trigger": {"type": "cron"}})] == ["$.trigger.cron.schedule"]
    assert [p.path for p in problems({"trigger": {"type": "cron"}}, tags=("cron", "manual"))] == ["$.trigger.schedule"]


def test_json_path_rendering() -> None:
    assert json_path(("steps", 0, "config", "url")) == "$.steps[0].config.url"
    assert json_path(("headers", "X-Api-Key")) == "$.headers['X-Api-Key']"
    assert json_path((), "config") == "config"


@pytest.mark.parametrize("cls", [StepFailed, StepError, ExpressionError, HttpRefused])
def test_step_errors_are_step_failures_in_the_one_tree(cls: type[Exception]) -> None:
    assert issubclass(cls, StepFailure)
    assert issubclass(cls, SluiceError)
