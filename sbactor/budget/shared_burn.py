"""The burn rate of a budget counter kept in Redis, from the shared spend this process reads.

With ``state.backend: redis`` each process serves only its share of the requests, so a burn
rate built from its own spend (what ``Counter`` does) is about 1/N of the real one with N
processes, and ``act_on: forecast`` would land late. But every pre-flight reply carries the
counter's shared spend (all processes), so successive readings give the whole rate with no more
Redis state: an EWMA of the shared spend's growth, one sample per ``forecast_interval_s`` as in
``Counter``. A gap of k intervals between two readings counts as k samples of the gap's
average, so a team that stops spending stops looking dangerous; a new window restarts the spend
from zero, which is then the baseline. Only spent money is read, never reservations: a hold
settling below its worst case would otherwise look like spend that came and went.
"""

from __future__ import annotations

import math

import attrs

from sbactor.budget.counter import used_fraction


@attrs.define(eq=False)
class SharedBurn:
    interval: float  # sample length (s): ``counter.sample_interval``
    alpha: float  # EWMA weight of the newest sample
    rate_cost: float = 0.0  # USD / s, all processes
    rate_tokens: float = 0.0  # tokens / s
    samples: int = 0
    _window: float = math.nan  # start of the window of the baseline (nan: no reading yet)
    _since: float = 0.0  # when the baseline was read
    _cost: float = 0.0  # the baseline: the shared spend then
    _tokens: float = 0.0

    def observe(self, now: float, window_start: float, cost: float, tokens: float) -> None:
        """Fold in one reading of the shared spend (spent, without reservations)."""
        if math.isnan(self._window):  # the first reading is the baseline
            self._window, self._since, self._cost, self._tokens = window_start, now, cost, tokens
            return
        if window_start != self._window:  # a new window: its spend started from zero
            self._window, self._cost, self._tokens = window_start, 0.0, 0.0
        elapsed = now - self._since
        n = int(elapsed // self.interval)
        if n <= 0:
            return
        cost_rate = max(cost - self._cost, 0.0) / elapsed
        token_rate = max(tokens - self._tokens, 0.0) / elapsed
        if self.samples == 0:  # the first sample is the rate, as in ``Counter``
            self.rate_cost, self.rate_tokens = cost_rate, token_rate
        else:
            keep = (1.0 - self.alpha) ** n
            self.rate_cost = keep * self.rate_cost + (1 - keep) * cost_rate
            self.rate_tokens = keep * self.rate_tokens + (1 - keep) * token_rate
        self.samples += n
        self._since, self._cost, self._tokens = now, cost, tokens

    def forecast(
        self,
        now: float,
        window_end: float,
        cost: float,
        tokens: float,
        max_cost: float | None,
        max_tokens: int | None,
        min_samples: int,
    ) -> float:
        """Fraction expected at the window's end if the shared rate holds (never below now)."""
        current = used_fraction(cost, tokens, max_cost, max_tokens)
        if self.samples < min_samples or math.isinf(window_end):
            return current
        remaining = max(window_end - now, 0.0)
        expected = used_fraction(
            cost + self.rate_cost * remaining,
            tokens + self.rate_tokens * remaining,
            max_cost,
            max_tokens,
        )
        return max(current, expected)
