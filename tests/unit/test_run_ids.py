"""Run ids (``runs.new_run_id``): UUIDv7, whose first 48 bits are the creation time in milliseconds."""

from __future__ import annotations

import time
import uuid

from sluice_common.runs import new_run_id, run_id_at


def test_the_layout_is_rfc_9562s_version_7() -> None:
    made = run_id_at(0x0123_4567_89AB, (1 << 74) - 1)
    assert str(made) == "01234567-89ab-7fff-bfff-ffffffffffff"
    assert (made.version, made.variant) == (7, uuid.RFC_4122)
    assert str(run_id_at(0x0123_4567_89AB, 0)) == "01234567-89ab-7000-8000-000000000000"
    # Bits past the 74 it uses, and past 48 of time, change nothing.
    assert run_id_at(1 << 48 | 5, 1 << 80 | 3) == run_id_at(5, 3)


def test_new_ids_carry_the_time_and_sort_by_it() -> None:
    before = time.time_ns() // 1_000_000
    first = new_run_id()
    time.sleep(0.002)
    second = new_run_id()
    after = time.time_ns() // 1_000_000
    for made in (first, second):
        assert made.version == 7
        assert before <= made.int >> 80 <= after
    assert first.int >> 80 < second.int >> 80
    assert first < second  # a later millisecond sorts after, as bytes and as text
    assert str(first) < str(second)
    assert len({new_run_id() for _ in range(1000)}) == 1000
