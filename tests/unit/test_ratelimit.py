import pytest

from sluice_common.ratelimit import WINDOW_MS, LocalRateLimiter
from sluice_worker.outcomes import backoff_ms


def test_local_window_admits_the_limit_then_says_how_long_to_wait() -> None:
    limiter = LocalRateLimiter(3)
    assert [limiter.acquire() for _ in range(3)] == [0, 0, 0]
    wait = limiter.acquire()
    assert 0 < wait <= WINDOW_MS
    assert limiter.used() == 3  # a refused start is not recorded


def test_raising_the_limit_admits_more_at_once() -> None:
    limiter = LocalRateLimiter(1)
    assert limiter.acquire() == 0
    assert limiter.acquire() > 0
    limiter.set_limit(2)
    assert limiter.acquire() == 0
    with pytest.raises(ValueError, match="at least 1"):
        limiter.set_limit(0)


@pytest.mark.parametrize("attempt", [1, 2, 3, 6, 20])
def test_backoff_is_jittered_within_bounds(attempt: int) -> None:
    values = {backoff_ms(attempt, 100, 5000) for _ in range(200)}
    ceiling = min(5000, 100 * 2 ** (attempt - 1))
    assert all(100 <= v <= ceiling for v in values)
    if ceiling > 100:
        assert len(values) > 1  # jitter spreads retries


def test_a_slot_taken_for_nothing_is_given_back() -> None:
    limiter = LocalRateLimiter(1)
    assert limiter.acquire() == 0
    limiter.release()
    assert limiter.used() == 0
    assert limiter.acquire() == 0
