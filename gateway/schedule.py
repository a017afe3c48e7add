"""Poll timing as pure functions of the clock (STYLE H9: time is injected, tested without sleeping).

* :func:`next_boundary` -- reads are aligned to interval boundaries (15 min for registers,
  1 min for instantaneous values by default), so every meter's reading lands on the same grid
  and ingest can compute interval deltas without resampling.
* :func:`backoff_ms` -- a meter that keeps failing is retried with exponential back-off (capped),
  so a dead meter never starves its bus; the first failures retry at the normal cadence.
* :func:`bus_retry_s` -- a bus that cannot be opened is retried after 1 s, 2 s, 4 s ... up to a
  minute, for as long as it stays down.
* :class:`MeterStats` -- per-meter counters and the read success rate (采集成功率).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MeterStats", "backoff_ms", "bus_retry_s", "next_boundary"]


def next_boundary(now_ms: int, interval_ms: int, offset_ms: int = 0) -> int:
    """The first boundary ``k * interval_ms + offset_ms`` strictly after ``now_ms``."""
    if interval_ms <= 0:
        raise ValueError("interval_ms must be positive")
    k = (now_ms - offset_ms) // interval_ms + 1
    return k * interval_ms + offset_ms


def backoff_ms(
    consecutive_failures: int, interval_ms: int, *, free_failures: int = 2, cap_ms: int = 3_600_000
) -> int:
    """How long to skip a meter after ``consecutive_failures`` failed cycles.

    The first ``free_failures`` failures cost nothing extra (the next cycle retries); after that
    the wait doubles per failure, from one interval up to ``cap_ms`` (but never below one interval).
    """
    if consecutive_failures <= free_failures:
        return 0
    exponent = min(consecutive_failures - free_failures - 1, 30)
    return max(interval_ms, min(cap_ms, interval_ms * (1 << exponent)))


def bus_retry_s(failed_attempts: int, *, first_s: float = 1.0, cap_s: float = 60.0) -> float:
    """How long to wait before reopening a bus that failed to open ``failed_attempts`` times
    in a row (>= 1): ``first_s`` doubled per further failure, capped at ``cap_s``."""
    if failed_attempts < 1 or not 0 < first_s <= cap_s:
        raise ValueError("expected failed_attempts >= 1 and 0 < first_s <= cap_s")
    return min(cap_s, first_s * 2.0 ** min(failed_attempts - 1, 62))


FAILURE_CAUSES = ("timeout", "checksum", "error_reply", "transport", "other")


@dataclass(slots=True)
class MeterStats:
    """Counters for one meter: attempts, successes, failures by cause, last success.

    ``success_rate`` is the utility's headline KPI: successful reads over attempted reads."""

    attempts: int = 0
    successes: int = 0
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_CAUSES, 0))
    consecutive_failures: int = 0
    last_success_ms: int = 0
    skip_until_ms: int = 0

    def record_success(self, now_ms: int) -> None:
        self.attempts += 1
        self.successes += 1
        self.consecutive_failures = 0
        self.last_success_ms = now_ms
        self.skip_until_ms = 0

    def record_failure(self, cause: str, now_ms: int, interval_ms: int) -> None:
        if cause not in self.failures:
            cause = "other"
        self.attempts += 1
        self.failures[cause] += 1
        self.consecutive_failures += 1
        self.skip_until_ms = now_ms + backoff_ms(self.consecutive_failures, interval_ms)

    @property
    def success_rate(self) -> float:
        return self.successes / self.attempts if self.attempts else 1.0
