"""Requests- and tokens-per-minute limits over a sliding 60 s window of 1 s buckets.

``check`` only looks; ``commit`` records the admission (so a request refused later by a budget
does not use up rate). Tokens are admitted at their worst case and ``adjust`` corrects the bucket
to the actual count once the call is done. ``retry_after_s`` is when enough old buckets slide out.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Sequence

import attrs

from sbactor.budget.config import RateLimitConfig
from sbactor.budget.scopes import RequestScopes, rate_counters_for

WINDOW_S = 60.0


@attrs.frozen
class RateRefused:
    limit: str
    scope: str
    value: str
    dimension: str  # "rpm" | "tpm"
    cap: int
    used: float
    retry_after_s: float

    @property
    def description(self) -> str:
        return f"{self.limit} [{self.scope}={self.value}]"

    @property
    def message(self) -> str:
        return (
            f"rate limit exceeded: {self.description} allows {self.cap} "
            f"{'requests' if self.dimension == 'rpm' else 'tokens'} per minute; "
            f"retry after {math.ceil(self.retry_after_s)} s"
        )


@attrs.frozen
class RateStatistics:
    limits: int
    counters: int
    admitted: int
    refused: int


@attrs.define(eq=False)
class _Window:
    buckets: deque[list[float]] = attrs.field(factory=deque)  # [second, requests, tokens]
    requests: float = 0.0
    tokens: float = 0.0

    def slide(self, now: float) -> None:
        horizon = math.floor(now) - WINDOW_S
        while self.buckets and self.buckets[0][0] <= horizon:
            _, r, t = self.buckets.popleft()
            self.requests -= r
            self.tokens -= t
        if not self.buckets:
            self.requests = self.tokens = 0.0

    def retry_after(self, index: int, need: float, now: float) -> float:
        dropped = 0.0
        for b in self.buckets:
            dropped += b[index]
            if dropped >= need:
                return max(b[0] + WINDOW_S - now, 0.001)
        return WINDOW_S


@attrs.define(eq=False)
class RateLimiter:
    limits: Sequence[RateLimitConfig]
    _windows: dict[tuple[int, str], _Window] = attrs.field(init=False, factory=dict)
    _pending: OrderedDict[str, tuple[float, float, list[tuple[int, str]]]] = attrs.field(
        init=False, factory=OrderedDict
    )
    _admitted: int = attrs.field(init=False, default=0)
    _refused: int = attrs.field(init=False, default=0)

    def _window(self, key: tuple[int, str], now: float) -> _Window:
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = _Window()
        w.slide(now)
        return w

    def check(self, scopes: RequestScopes, tokens: int, now: float) -> RateRefused | None:
        """The first limit this request would break, or None. Records nothing."""
        for key in rate_counters_for(self.limits, scopes):
            limit = self.limits[key[0]]
            w = self._window(key, now)
            if limit.rpm is not None and w.requests + 1 > limit.rpm:
                self._refused += 1
                need = w.requests + 1 - limit.rpm
                return RateRefused(
                    limit.label, limit.scope, key[1], "rpm", limit.rpm, w.requests,
                    w.retry_after(1, need, now),
                )  # fmt: skip
            if limit.tpm is not None and w.tokens + tokens > limit.tpm:
                self._refused += 1
                need = w.tokens + tokens - limit.tpm
                retry = WINDOW_S if tokens > limit.tpm else w.retry_after(2, need, now)
                return RateRefused(
                    limit.label, limit.scope, key[1], "tpm", limit.tpm, w.tokens, retry
                )
        return None

    def commit(self, request_id: str, scopes: RequestScopes, tokens: int, now: float) -> None:
        keys = rate_counters_for(self.limits, scopes)
        second = float(math.floor(now))
        for key in keys:
            w = self._window(key, now)
            if w.buckets and w.buckets[-1][0] == second:
                w.buckets[-1][1] += 1
                w.buckets[-1][2] += tokens
            else:
                w.buckets.append([second, 1.0, float(tokens)])
            w.requests += 1
            w.tokens += tokens
        self._admitted += 1
        if keys:
            self._pending[request_id] = (second, float(tokens), keys)
        while self._pending:  # forget admissions whose bucket has slid out
            first = next(iter(self._pending.values()))
            if first[0] > second - WINDOW_S:
                break
            self._pending.popitem(last=False)

    def adjust(self, request_id: str, actual_tokens: int, now: float) -> None:
        """Replace the admitted worst-case tokens by the actual count (if still in window)."""
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return
        second, admitted, keys = pending
        delta = actual_tokens - admitted
        for key in keys:
            w = self._window(key, now)
            for b in w.buckets:
                if b[0] == second:
                    b[2] = max(b[2] + delta, 0.0)
                    w.tokens = max(w.tokens + delta, 0.0)
                    break

    def statistics(self) -> RateStatistics:
        return RateStatistics(len(self.limits), len(self._windows), self._admitted, self._refused)
