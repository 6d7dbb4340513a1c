"""A batched wake-up's body is what Dramatiq's Redis broker would have stored for the same message."""

from __future__ import annotations

import dramatiq
import pytest

from sluice_common.broker import RUN_ACTOR, RUN_QUEUE, run_message, wakeup_body


@pytest.mark.parametrize(("eta", "traceparent"), [(None, None), (1_900_000_000_000, None), (None, "00-ab-cd-01")])
def test_wakeup_body_decodes_like_a_dramatiq_message(eta: int | None, traceparent: str | None) -> None:
    queue_name, body = wakeup_body("run-1", "redis-id", eta, traceparent)
    decoded = dramatiq.Message.decode(body)

    message, _ = run_message("run-1", traceparent=traceparent)
    options: dict[str, object] = {"redis_message_id": "redis-id"}
    if eta is not None:
        options["eta"] = eta
    expected = message.copy(queue_name=f"{RUN_QUEUE}.DQ" if eta else RUN_QUEUE, options=options)

    assert decoded.asdict() | {"message_id": "", "message_timestamp": 0} == expected.asdict() | {
        "message_id": "",
        "message_timestamp": 0,
    }
    assert queue_name == expected.queue_name
    assert decoded.actor_name == RUN_ACTOR
    assert decoded.args == ("run-1",)
    assert len(decoded.message_id) == 36
    assert decoded.message_timestamp > 1_700_000_000_000
