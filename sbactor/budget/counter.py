"""One budget counter: spend in the current window, in-flight reservations and the burn rate.

Calendar windows reset ``spent`` when a new window starts (reservations in flight carry over:
they still count against whichever window they are reconciled in). Rolling windows keep
``ROLLING_BUCKETS`` buckets and drop the ones that slid out. The burn rate is an EWMA over fixed
sample intervals, ``rate <- alpha * (interval spend / interval) + (1 - alpha) * rate``; idle
intervals count as zero spend, so a team that stops spending stops looking dangerous.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import attrs

from sbactor.budget.config import Window
from sbactor.budget.windows import (
    WINDOW_SECONDS,
    bucket_start,
    rolling_bucket_width,
    window_end,
    window_length,
    window_start,
)


def _frac(used: float, cap: float | None) -> float:
    return 0.0 if cap is None else used / cap


def used_fraction(
    cost: float, tokens: float, max_cost: float | None, max_tokens: int | None
) -> float:
    """The tighter of the cost and token fractions of a cap."""
    return max(_frac(cost, max_cost), _frac(tokens, max_tokens))


def sample_interval(window: Window, interval_s: float) -> float:
    """A burn-rate sample's length: ``forecast_interval_s``, at most a tenth of the window."""
    return max(min(interval_s, WINDOW_SECONDS[window] / 10), 1.0)


@attrs.define(eq=False)
class Counter:
    window: Window
    rolling: bool
    max_cost: float | None
    max_tokens: int | None
    interval: float  # burn-rate sample length (s)
    alpha: float
    start: float = -math.inf
    end: float = math.inf  # calendar: cached end of the current window
    spent_cost: float = 0.0
    spent_tokens: float = 0.0
    reserved_cost: float = 0.0
    reserved_tokens: float = 0.0
    holds: int = 0  # reservations in flight on this counter
    buckets: deque[list[float]] = attrs.field(factory=deque)  # rolling: [start, cost, tokens]
    rate_cost: float = 0.0  # USD / s
    rate_tokens: float = 0.0  # tokens / s
    samples: int = 0
    sample_start: float = 0.0
    sample_cost: float = 0.0
    sample_tokens: float = 0.0

    @classmethod
    def new(
        cls,
        window: Window,
        rolling: bool,
        max_cost: float | None,
        max_tokens: int | None,
        *,
        interval_s: float,
        alpha: float,
        now: float,
    ) -> Counter:
        c = cls(window, rolling, max_cost, max_tokens, sample_interval(window, interval_s), alpha)
        if not rolling:
            c.start, c.end = window_start(window, now), window_end(window, now)
        c.sample_start = bucket_start(c.interval, now)
        return c

    # ---- time --------------------------------------------------------------------------

    def advance(self, now: float) -> None:
        """Bring the counter to ``now``: reset/slide the window, close burn-rate samples."""
        if self.rolling:
            horizon = now - WINDOW_SECONDS[self.window]
            width = rolling_bucket_width(self.window)
            while self.buckets and self.buckets[0][0] + width <= horizon:
                _, cost, tokens = self.buckets.popleft()
                self.spent_cost -= cost
                self.spent_tokens -= tokens
            if not self.buckets:
                self.spent_cost = self.spent_tokens = 0.0  # no float drift when empty
        elif not self.start <= now < self.end:
            start = window_start(self.window, now)
            if start != self.start:
                self.start = start
                self.spent_cost = self.spent_tokens = 0.0
            self.end = window_end(self.window, now)
        self._close_samples(now)

    def _close_samples(self, now: float) -> None:
        elapsed = math.floor((now - self.sample_start) / self.interval)
        if elapsed <= 0:
            return
        cost_rate = self.sample_cost / self.interval
        token_rate = self.sample_tokens / self.interval
        if self.samples == 0:
            self.rate_cost, self.rate_tokens = cost_rate, token_rate
        else:
            self.rate_cost += self.alpha * (cost_rate - self.rate_cost)
            self.rate_tokens += self.alpha * (token_rate - self.rate_tokens)
        idle = elapsed - 1  # the remaining closed intervals had no spend
        if idle:
            decay = (1 - self.alpha) ** idle
            self.rate_cost *= decay
            self.rate_tokens *= decay
        self.samples += elapsed
        self.sample_start += elapsed * self.interval
        self.sample_cost = self.sample_tokens = 0.0

    # ---- spend -------------------------------------------------------------------------

    def fits(self, cost: float, tokens: float) -> str | None:
        """None if the amount fits under the caps with what is spent and reserved, else the
        dimension ("cost" / "tokens") that would overflow."""
        if self.max_cost is not None and self.spent_cost + self.reserved_cost + cost > (
            self.max_cost * (1 + 1e-12)
        ):
            return "cost"
        if self.max_tokens is not None and (
            self.spent_tokens + self.reserved_tokens + tokens > self.max_tokens
        ):
            return "tokens"
        return None

    def add_spend(self, cost: float, tokens: float, now: float) -> None:
        self.spent_cost += cost
        self.spent_tokens += tokens
        self.sample_cost += cost
        self.sample_tokens += tokens
        if self.rolling:
            b = bucket_start(rolling_bucket_width(self.window), now)
            if self.buckets and self.buckets[-1][0] == b:
                self.buckets[-1][1] += cost
                self.buckets[-1][2] += tokens
            else:
                self.buckets.append([b, cost, tokens])

    # ---- views -------------------------------------------------------------------------

    def fraction(self) -> float:
        """Tightest of the cost and token fractions, reservations included."""
        return used_fraction(
            self.spent_cost + self.reserved_cost,
            self.spent_tokens + self.reserved_tokens,
            self.max_cost,
            self.max_tokens,
        )

    def forecast(self, now: float, min_samples: int) -> float:
        """Fraction expected at the window's end if the burn rate holds (never below now)."""
        current = self.fraction()
        if self.samples < min_samples or self.window == "total":
            return current
        if self.rolling:
            span = WINDOW_SECONDS[self.window]  # steady state of a rolling window
            cost = self.reserved_cost + max(self.spent_cost, self.rate_cost * span)
            tokens = self.reserved_tokens + max(self.spent_tokens, self.rate_tokens * span)
        else:
            remaining = max(self.end - now, 0.0)
            cost = self.spent_cost + self.reserved_cost + self.rate_cost * remaining
            tokens = self.spent_tokens + self.reserved_tokens + self.rate_tokens * remaining
        return max(current, used_fraction(cost, tokens, self.max_cost, self.max_tokens))

    def resets_at(self, now: float) -> float:
        """When spend next drops: window end (calendar), oldest bucket leaving (rolling)."""
        if self.rolling:
            if not self.buckets:
                return now
            return (
                self.buckets[0][0] + rolling_bucket_width(self.window) + WINDOW_SECONDS[self.window]
            )
        return self.end

    def retry_after(self, dimension: str, cost: float, tokens: float, now: float) -> float | None:
        """Seconds until ``cost``/``tokens`` could fit; None if it never can (exceeds the cap
        or the window is ``total``)."""
        cap = self.max_cost if dimension == "cost" else self.max_tokens
        amount = cost if dimension == "cost" else tokens
        spent = self.spent_cost if dimension == "cost" else self.spent_tokens
        assert cap is not None
        if amount > cap:
            return None
        if spent + amount <= cap:
            return 1.0  # only in-flight reservations are in the way; they settle soon
        if self.rolling:
            need = spent + amount - cap
            width = rolling_bucket_width(self.window)
            dropped = 0.0
            for b in self.buckets:
                dropped += b[1] if dimension == "cost" else b[2]
                if dropped >= need:
                    return max(b[0] + width + WINDOW_SECONDS[self.window] - now, 1.0)
            return None
        if self.window == "total":
            return None
        return max(self.end - now, 1.0)

    def window_length(self, now: float) -> float:
        return window_length(self.window, now)

    # ---- persistence -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": None if math.isinf(self.start) else self.start,
            "spent_cost": self.spent_cost,
            "spent_tokens": self.spent_tokens,
            "buckets": [list(b) for b in self.buckets],
            "rate_cost": self.rate_cost,
            "rate_tokens": self.rate_tokens,
            "samples": self.samples,
            "sample_start": self.sample_start,
            "sample_cost": self.sample_cost,
            "sample_tokens": self.sample_tokens,
        }

    def load_dict(self, data: dict[str, Any], now: float) -> None:
        start = data.get("start")
        self.start = -math.inf if start is None else float(start)
        self.spent_cost = float(data.get("spent_cost", 0.0))
        self.spent_tokens = float(data.get("spent_tokens", 0.0))
        self.buckets = deque([float(x) for x in b] for b in data.get("buckets", []))
        self.rate_cost = float(data.get("rate_cost", 0.0))
        self.rate_tokens = float(data.get("rate_tokens", 0.0))
        self.samples = int(data.get("samples", 0))
        self.sample_start = float(data.get("sample_start", bucket_start(self.interval, now)))
        self.sample_cost = float(data.get("sample_cost", 0.0))
        self.sample_tokens = float(data.get("sample_tokens", 0.0))
        self.end = -math.inf  # force advance() to recompute the window
        if self.rolling:
            self.start = -math.inf
        self.advance(now)  # windows that ended while we were down reset here
