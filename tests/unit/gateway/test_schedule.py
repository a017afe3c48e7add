from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.schedule import MeterStats, backoff_ms, bus_retry_s, next_boundary

MIN15 = 900_000


def test_next_boundary_aligns_to_the_grid() -> None:
    assert next_boundary(0, MIN15) == MIN15
    assert next_boundary(MIN15 - 1, MIN15) == MIN15
    assert next_boundary(MIN15, MIN15) == 2 * MIN15  # strictly after
    assert next_boundary(1_700_000_123_456, 60_000) == 1_700_000_160_000
    assert next_boundary(10, 100, offset_ms=5) == 105
    with pytest.raises(ValueError):
        next_boundary(0, 0)


@given(st.integers(0, 2**50), st.integers(1, 10**8))
def test_next_boundary_properties(now: int, interval: int) -> None:
    b = next_boundary(now, interval)
    assert b % interval == 0 and now < b <= now + interval


def test_backoff_is_free_at_first_then_doubles_and_caps() -> None:
    assert [backoff_ms(n, 60_000) for n in range(0, 3)] == [0, 0, 0]
    assert [backoff_ms(n, 60_000) for n in range(3, 7)] == [60_000, 120_000, 240_000, 480_000]
    assert backoff_ms(100, 60_000) == 3_600_000
    assert backoff_ms(100, 7_200_000) == 7_200_000  # never below one interval


def test_meter_stats_success_rate_and_skip() -> None:
    s = MeterStats()
    assert s.success_rate == 1.0
    s.record_success(1)
    for i in range(3):
        s.record_failure("timeout", 10 + i, 60_000)
    s.record_failure("weird", 20, 60_000)
    assert s.attempts == 5 and s.successes == 1 and s.success_rate == pytest.approx(0.2)
    assert s.failures["timeout"] == 3 and s.failures["other"] == 1
    assert s.skip_until_ms == 20 + 120_000
    s.record_success(30)
    assert s.skip_until_ms == 0 and s.consecutive_failures == 0


def test_bus_retry_doubles_from_one_second_to_a_minute() -> None:
    assert [bus_retry_s(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert bus_retry_s(10_000) == 60
    assert bus_retry_s(3, first_s=0.5, cap_s=10) == 2
    with pytest.raises(ValueError):
        bus_retry_s(0)
