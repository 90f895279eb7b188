"""Window arithmetic in UTC epoch seconds: calendar-aligned starts/ends, rolling durations.

Calendar windows start on the UTC minute/hour/day/first-of-month; ``total`` never resets.
A rolling window covers the last ``duration`` seconds (a rolling month is 30 days).
"""

from __future__ import annotations

import datetime as dt
import math

from sbactor.budget.config import Window

WINDOW_SECONDS: dict[str, float] = {
    "minute": 60.0,
    "hour": 3600.0,
    "day": 86400.0,
    "month": 30 * 86400.0,
    "total": math.inf,
}

# Rolling windows are kept as this many buckets (their resolution is duration / BUCKETS).
ROLLING_BUCKETS = 60


def window_start(window: Window, now: float) -> float:
    """Start (epoch s) of the calendar window containing ``now``; ``-inf`` for ``total``."""
    if window == "total":
        return -math.inf
    if window == "month":
        t = dt.datetime.fromtimestamp(now, tz=dt.UTC)
        return dt.datetime(t.year, t.month, 1, tzinfo=dt.UTC).timestamp()
    size = WINDOW_SECONDS[window]
    return math.floor(now / size) * size


def window_end(window: Window, now: float) -> float:
    """End (exclusive, epoch s) of the calendar window containing ``now``; ``inf`` for total."""
    if window == "total":
        return math.inf
    if window == "month":
        t = dt.datetime.fromtimestamp(now, tz=dt.UTC)
        year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
        return dt.datetime(year, month, 1, tzinfo=dt.UTC).timestamp()
    return window_start(window, now) + WINDOW_SECONDS[window]


def window_length(window: Window, now: float) -> float:
    """Length of the window containing ``now`` (months vary: 28-31 days)."""
    if window == "month":
        return window_end(window, now) - window_start(window, now)
    return WINDOW_SECONDS[window]


def rolling_bucket_width(window: Window) -> float:
    return WINDOW_SECONDS[window] / ROLLING_BUCKETS


def bucket_start(width: float, now: float) -> float:
    return math.floor(now / width) * width


def iso(ts: float | None) -> str | None:
    """ISO-8601 UTC for an epoch time; None for never (``inf``/None)."""
    if ts is None or math.isinf(ts):
        return None
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat().replace("+00:00", "Z")
