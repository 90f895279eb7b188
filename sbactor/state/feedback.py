"""SharedFeedbackStore: per-deployment outcome statistics shared through Redis.

Each outcome (and each applied client feedback) is folded in locally, as before, and into the
shared EWMAs by one atomic Lua script (``scripts.FEEDBACK_UPDATE``: decay, then update — the
same arithmetic as ``sbactor.routing.stats``). Every ``state.local_cache_s`` the actor reads all
shared statistics in one round trip and replaces its routing map with them, so an outcome seen
by one instance moves routing on every other within that interval. Shared ``last_update`` is
wall time; it is mapped onto this process's clock when read.

The outcome of a served request also records ``request id → deployment`` in Redis (TTL
``state.feedback_ttl_s``), so ``POST /v1/feedback`` works on any instance: the feedback is
claimed once in Redis (``scripts.FEEDBACK_CLAIM``; a second claim on any instance is a
duplicate) and folded into the shared statistics in the same script.

Redis unavailable: routing goes on with the local statistics (outcomes are not queued: routing
feedback is a hint, not an account).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import attrs
import trio

from sbactor.actors.feedback_store import (
    FeedbackResult,
    FeedbackStore,
    _check_feedback,
    _Feedback,
)
from sbactor.actors.runtime import Actor, ActorClosed
from sbactor.routing.stats import EMPTY_STATS, DeploymentStats, Outcome, apply_feedback, decay
from sbactor.state.client import StateClient, StateUnavailable

log = logging.getLogger("sbactor.state.feedback")


@attrs.frozen
class _Refresh:
    pass


def stats_from_hash(fields: dict[str, str], age_s: float | None, now: float) -> DeploymentStats:
    """A shared stats hash → ``DeploymentStats`` on the local clock (``age_s``: wall seconds
    since its last update)."""

    def opt(name: str) -> float | None:
        value = fields.get(name)
        return None if value in (None, "") else float(value)

    return DeploymentStats(
        samples=int(fields.get("samples", 0)),
        successes=int(fields.get("successes", 0)),
        refusals=int(fields.get("refusals", 0)),
        feedback=int(fields.get("feedback", 0)),
        ewma_cost=opt("ewma_cost"),
        ewma_success=float(fields.get("ewma_success", 1.0)),
        ewma_refusal=float(fields.get("ewma_refusal", 0.0)),
        ewma_latency=opt("ewma_latency"),
        last_update=None if age_s is None else now - max(age_s, 0.0),
    )


@attrs.define(eq=False)
class SharedFeedbackStore(FeedbackStore):
    state: StateClient | None = None
    refresh_s: float = 1.0
    wall: Callable[[], float] = time.time
    request_ttl_s: int = 86400

    _pushed: int = attrs.field(init=False, default=0)
    _push_failures: int = attrs.field(init=False, default=0)
    _refreshes: int = attrs.field(init=False, default=0)
    _shared_deployments: int = attrs.field(init=False, default=0)
    _shared_feedback_counts: dict[str, int] = attrs.field(init=False, factory=dict)

    async def run(self, *, task_status: trio.TaskStatus[Actor] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._refresher)
            await super().run(task_status=task_status)
            nursery.cancel_scope.cancel()

    async def _refresher(self) -> None:
        while True:
            try:
                self.cast_nowait(_Refresh())
            except trio.WouldBlock:
                pass
            except ActorClosed:
                return
            await trio.sleep(max(self.refresh_s, 0.01))

    async def handle(self, message: Any) -> Any:
        if isinstance(message, Outcome):
            self._record(message)
            served = message.final  # not a failed earlier attempt
            await self._push(message.deployment_id, "outcome", [
                int(message.success), int(message.refused), repr(float(message.cost_usd)),
                repr(float(message.latency_s)), 0,
            ], request=(message.request_id, message.model, message.owner) if served else None)
            return None
        if isinstance(message, _Feedback):
            return await self._shared_feedback(message)
        if isinstance(message, _Refresh):
            await self._refresh()
            return None
        return await super().handle(message)

    async def _push(self, deployment_id: str, kind: str, values: list[Any],
                    request: tuple[str, str, str] | None = None) -> None:
        if self.state is None:
            return
        s = self.settings
        prefix = self.state.prefix
        keys = [f"{prefix}fb:{deployment_id}", f"{prefix}fb:index"]
        args = [deployment_id, repr(self.wall()), s.alpha, s.decay_s, kind, *values]
        if request is not None:
            keys.append(f"{prefix}req:{request[0]}")
            args += [request[1], self.request_ttl_s, request[2]]
        try:
            await self.state.run_script("feedback_update", keys, args)
        except StateUnavailable:
            self._push_failures += 1
            return
        self._pushed += 1

    async def _shared_feedback(self, message: _Feedback) -> FeedbackResult:
        """Claim the feedback in Redis (first claim wins on every instance) and fold it into
        the shared stats; without Redis, or for a request Redis does not know, decide locally."""
        value = _check_feedback(message.outcome, message.score)
        reply: Any = None
        if self.state is not None:
            prefix = self.state.prefix
            try:
                reply = await self.state.run_script(
                    "feedback_claim",
                    [f"{prefix}req:{message.request_id}", f"{prefix}fb:index"],
                    [f"{prefix}fb:", repr(self.wall()), self.settings.alpha,
                     self.settings.decay_s, repr(value), message.owner],
                )
            except StateUnavailable:
                reply = None
        if reply is None or reply[0] == "unknown":
            result = self._apply(message)
            if reply is not None and result.status == "applied" and result.deployment_id:
                # served here but its mapping never reached redis: the stats still should
                await self._push(result.deployment_id, "feedback", [0, 0, 0, 0, repr(value)])
            return result
        status, deployment_id, model = reply[0], reply[1], reply[2]
        self._shared_feedback_counts[status] = self._shared_feedback_counts.get(status, 0) + 1
        self._served.mark_done(message.request_id)
        if status == "applied":
            # fold it into this process's view now; the next refresh brings the shared one
            now = self.clock()
            s = self.settings
            current = decay(self._stats.get(deployment_id, EMPTY_STATS), now, s.decay_s)
            self._replace(deployment_id, apply_feedback(current, value, s.alpha, now))
            self._feedback_counts["applied"] += 1
        else:
            self._feedback_counts["duplicate"] += 1
        return FeedbackResult(status, message.request_id, deployment_id, model or None,
                              message.outcome, message.score)

    async def _refresh(self) -> None:
        if self.state is None:
            return
        prefix = self.state.prefix
        try:
            reply = await self.state.run_script("feedback_read", [f"{prefix}fb:index"],
                                                [f"{prefix}fb:"])
        except StateUnavailable:
            return
        now, wall = self.clock(), self.wall()
        merged = dict(self._stats)
        for i in range(0, len(reply), 2):
            flat = reply[i + 1]
            fields = dict(zip(flat[0::2], flat[1::2], strict=True))
            if not fields:
                continue
            last = fields.get("last_update")
            age = None if last is None else wall - float(last)
            merged[reply[i]] = stats_from_hash(fields, age, now)
        self._stats = MappingProxyType(merged)
        self._refreshes += 1
        self._shared_deployments = len(reply) // 2

    def state_summary(self) -> dict[str, Any]:
        out = super().state_summary()
        out.update({
            "backend": "redis",
            "pushed": self._pushed,
            "push_failures": self._push_failures,
            "refreshes": self._refreshes,
            "shared_deployments": self._shared_deployments,
            "shared_feedback": dict(self._shared_feedback_counts),
        })
        return out
