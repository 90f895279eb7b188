"""Backoff: exponential with full jitter, Retry-After honoured up to a cap, never past the deadline.

Full jitter (a uniform draw in ``[0, min(max, base * 2**n)]``) spreads retries of many clients
that failed together, which is what a rate-limited or overloaded upstream needs.
"""

from __future__ import annotations

import random
from typing import Literal

import attrs

__all__ = ["Delay", "retry_delay"]


@attrs.frozen
class Delay:
    """A chosen delay. ``clipped`` = the wanted delay did not fit in the remaining deadline."""

    delay_s: float
    wanted_s: float
    source: Literal["jitter", "retry_after"]
    clipped: bool


def retry_delay(
    retry_number: int,
    *,
    base_s: float,
    max_s: float,
    rng: random.Random,
    remaining_s: float,
    retry_after_s: float | None = None,
    max_retry_after_s: float = 30.0,
) -> Delay:
    """Delay before retry ``retry_number`` (1 = first retry).

    A stated ``retry_after_s`` replaces the jittered delay, capped at ``max_retry_after_s`` (an
    upstream asking for minutes is not waited on for minutes). The result never exceeds
    ``remaining_s``; ``clipped`` tells the caller the wait it wanted did not fit.
    """
    remaining_s = max(0.0, remaining_s)
    if retry_after_s is not None:
        wanted = min(max(0.0, retry_after_s), max_retry_after_s)
        source: Literal["jitter", "retry_after"] = "retry_after"
    else:
        ceiling = min(max_s, base_s * 2.0 ** max(0, retry_number - 1))
        wanted = rng.uniform(0.0, ceiling)
        source = "jitter"
    clipped = wanted >= remaining_s
    return Delay(min(wanted, remaining_s), wanted, source, clipped)
