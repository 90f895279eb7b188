"""Deployment cooldowns: ``allowed_fails`` failures in a row within ``fail_window_s`` bench a
deployment for ``cooldown_s``, so routing stops sending traffic at a deployment that is down.

Sync and owned by one task (the router); no awaits. Only causes that say something about the
deployment's health count (server_error, timeout, connection, rate_limit); a bad request or an
oversized prompt is the caller's problem, not the deployment's. A success clears the streak, so a
busy, healthy deployment is not benched by a few scattered errors.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs

from sbactor.resilience.failure import FailureClass

__all__ = ["COOLDOWN_CLASSES", "CooldownStatistics", "CooldownTracker"]

COOLDOWN_CLASSES = frozenset({FailureClass.SERVER_ERROR, FailureClass.TIMEOUT,
                              FailureClass.CONNECTION, FailureClass.RATE_LIMIT})


@attrs.frozen
class CooldownStatistics:
    deployments_tracked: int
    cooling: int
    cooldowns_started: int
    failures_counted: int
    failures_ignored: int


@attrs.define
class _Health:
    fails: deque[float]
    last_cls: FailureClass | None = None
    cooling_until: float | None = None
    cooldowns: int = 0
    last_success: float | None = None


@attrs.define(eq=False)
class CooldownTracker:
    """Per-deployment failure streaks and cooldowns; times come from the caller's clock."""

    allowed_fails: int = 3
    fail_window_s: float = 60.0
    cooldown_s: float = 30.0
    max_retry_after_s: float = 30.0
    _health: dict[str, _Health] = attrs.field(factory=dict, init=False)
    _started: int = attrs.field(default=0, init=False)
    _counted: int = attrs.field(default=0, init=False)
    _ignored: int = attrs.field(default=0, init=False)

    @classmethod
    def from_config(cls, config: Any) -> CooldownTracker:
        """Build from a ``ResilienceConfig``."""
        return cls(allowed_fails=config.allowed_fails, fail_window_s=config.fail_window_s,
                   cooldown_s=config.cooldown_s, max_retry_after_s=config.max_retry_after_s)

    def _get(self, deployment_id: str) -> _Health:
        health = self._health.get(deployment_id)
        if health is None:
            health = self._health[deployment_id] = _Health(deque(maxlen=self.allowed_fails))
        return health

    def record_failure(self, deployment_id: str, cls: FailureClass, now: float,
                       retry_after_s: float | None = None) -> bool:
        """Count a failure; True when it started a cooldown. A rate limit whose Retry-After is
        longer than ``cooldown_s`` cools the deployment for that long (capped)."""
        if cls not in COOLDOWN_CLASSES:
            self._ignored += 1
            return False
        self._counted += 1
        health = self._get(deployment_id)
        health.last_cls = cls
        if health.cooling_until is not None and now < health.cooling_until:
            return False  # already benched (a request that was in flight when it started)
        while health.fails and now - health.fails[0] > self.fail_window_s:
            health.fails.popleft()
        health.fails.append(now)
        if len(health.fails) < self.allowed_fails:
            return False
        length = self.cooldown_s
        if cls is FailureClass.RATE_LIMIT and retry_after_s is not None:
            length = max(length, min(retry_after_s, self.max_retry_after_s))
        health.cooling_until = now + length
        health.fails.clear()
        health.cooldowns += 1
        self._started += 1
        return True

    def record_success(self, deployment_id: str, now: float) -> None:
        health = self._get(deployment_id)
        health.fails.clear()
        health.last_success = now

    def is_cooling(self, deployment_id: str, now: float) -> bool:
        health = self._health.get(deployment_id)
        return bool(health and health.cooling_until is not None and now < health.cooling_until)

    def cooling_remaining_s(self, deployment_id: str, now: float) -> float:
        health = self._health.get(deployment_id)
        if health is None or health.cooling_until is None:
            return 0.0
        return max(0.0, health.cooling_until - now)

    def snapshot(self, now: float) -> dict[str, dict[str, Any]]:
        """Per deployment: cooling, remaining cooldown, recent failures (for /admin/routing)."""
        out: dict[str, dict[str, Any]] = {}
        for dep, h in sorted(self._health.items()):
            recent = sum(1 for t in h.fails if now - t <= self.fail_window_s)
            remaining = self.cooling_remaining_s(dep, now)
            out[dep] = {
                "cooling": remaining > 0,
                "cooldown_remaining_s": round(remaining, 3),
                "recent_fails": recent,
                "allowed_fails": self.allowed_fails,
                "last_failure_class": h.last_cls.value if h.last_cls else None,
                "cooldowns": h.cooldowns,
            }
        return out

    def statistics(self, now: float | None = None) -> CooldownStatistics:
        cooling = 0 if now is None else sum(1 for d in self._health if self.is_cooling(d, now))
        return CooldownStatistics(len(self._health), cooling, self._started, self._counted,
                                  self._ignored)
