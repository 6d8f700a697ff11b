"""Retry policy arithmetic: pure functions, no sleeping."""

from __future__ import annotations

import random

from flowcore.config import StepRetryConfig

__all__ = ["retry_delay", "should_retry"]


def retry_delay(policy: StepRetryConfig, retry_number: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry `retry_number` (1-based).

    `delay * backoff**(k-1)`, capped by `max_delay`, plus up to `jitter` of itself at random.
    """
    base = policy.delay * policy.backoff ** (retry_number - 1)
    if policy.max_delay is not None:
        base = min(base, policy.max_delay)
    if policy.jitter and base:
        base += base * policy.jitter * (rng or random).random()
    return float(base)


def should_retry(policy: StepRetryConfig | None, attempt: int, exc: BaseException) -> bool:
    """Whether a step that just failed its `attempt`-th try (1-based) is tried again."""
    if policy is None or attempt > policy.max_retries:
        return False
    return isinstance(exc, policy.retry_on)
