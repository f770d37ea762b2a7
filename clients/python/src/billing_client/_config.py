"""Defaults and the retry policy."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TIMEOUT = 10.0

# Statuses that mean "not now" rather than "no": the request may not have run, or was shed before it ran.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How hard to try before raising `ServiceUnavailable`.

    Waits grow exponentially from `wait_initial` up to `wait_max`, plus up to `wait_jitter` seconds of random
    jitter so that many clients retrying together do not stampede the service. A `Retry-After` header on a
    429/503 replaces the computed wait (capped at `wait_max_retry_after`). `attempts=1` disables retries.

    >>> RetryPolicy(attempts=3, timeout=5.0)
    RetryPolicy(attempts=3, timeout=5.0, wait_initial=0.1, wait_max=5.0, wait_jitter=0.5, wait_max_retry_after=30.0)
    """

    attempts: int = 5
    timeout: float = 30.0
    wait_initial: float = 0.1
    wait_max: float = 5.0
    wait_jitter: float = 0.5
    wait_max_retry_after: float = 30.0


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1)
