"""Per-deployment outcome statistics and the outcome-aware score (pure, no I/O, no trio).

Every served (or provider-refused) request updates EWMAs of realized cost, success, refusal and
latency for the deployment that answered it. The score turns them into *expected cost per
successful outcome*::

    score = (ewma_cost / success_rate) * (1 + refusal_rate) * (1 + latency_weight * ewma_latency_s)

Lower is better. ``ewma_cost / success_rate`` is what one *successful* request really costs when
failures still burn money; ``(1 + refusal_rate)`` penalises providers that refuse prompts even when
the refusal is served with a 2xx; the latency factor is off unless ``latency_weight > 0``. A
deployment that has been tried but never succeeded scores infinity. Costs are floored at
``COST_FLOOR_USD`` so free (mock/self-hosted) deployments are still ranked by reliability.

Stale statistics decay back toward the prior (success 1, refusal 0) with time constant
``decay_s``, so a provider that had a bad minute is not banished until restart.
"""

from __future__ import annotations

import math

import attrs

#: Costs below this are treated as this, so a free deployment still ranks by success/refusal.
COST_FLOOR_USD = 1e-9
#: The prior a fresh or long-idle deployment is assumed to have.
PRIOR_SUCCESS = 1.0
PRIOR_REFUSAL = 0.0


@attrs.frozen
class Outcome:
    """The realized outcome of one request on one deployment (the end-of-request usage event).

    ``success``: the final response was served 2xx. ``refused``: the *provider* refused
    (finish_reason ``content_filter``, a refusal field, or a content-policy error). The gateway's
    own pre-dispatch blocks are never turned into an ``Outcome``.
    """

    request_id: str
    deployment_id: str
    model: str
    success: bool
    refused: bool = False
    cost_usd: float = 0.0
    latency_s: float = 0.0
    owner: str = ""  # the virtual key that asked: only it may send feedback on this request
    #: the attempt that answered the client; a failed earlier attempt only teaches the router
    #: (``POST /v1/feedback`` names the request, i.e. its final attempt)
    final: bool = True


@attrs.frozen
class DeploymentStats:
    """Immutable EWMAs and counters for one deployment; ``last_update`` is on the caller's clock."""

    samples: int = 0
    successes: int = 0
    refusals: int = 0
    feedback: int = 0
    ewma_cost: float | None = None
    ewma_success: float = PRIOR_SUCCESS
    ewma_refusal: float = PRIOR_REFUSAL
    ewma_latency: float | None = None
    last_update: float | None = None

    @property
    def never_succeeded(self) -> bool:
        return self.samples > 0 and self.successes == 0


EMPTY_STATS = DeploymentStats()


def update_stats(
    stats: DeploymentStats, outcome: Outcome, alpha: float, now: float
) -> DeploymentStats:
    """Fold one outcome in. Cost and latency start at the first observation; rates at the prior."""
    cost = max(0.0, outcome.cost_usd)
    latency = max(0.0, outcome.latency_s)
    keep = 1.0 - alpha
    # the constructor, not attrs.evolve: this runs once per request and evolve is ~4x slower
    return DeploymentStats(
        samples=stats.samples + 1,
        successes=stats.successes + (1 if outcome.success else 0),
        refusals=stats.refusals + (1 if outcome.refused else 0),
        feedback=stats.feedback,
        ewma_cost=cost if stats.ewma_cost is None else keep * stats.ewma_cost + alpha * cost,
        ewma_success=keep * stats.ewma_success + (alpha if outcome.success else 0.0),
        ewma_refusal=keep * stats.ewma_refusal + (alpha if outcome.refused else 0.0),
        ewma_latency=(
            latency if stats.ewma_latency is None else keep * stats.ewma_latency + alpha * latency
        ),
        last_update=now,
    )


def apply_feedback(
    stats: DeploymentStats, value: float, alpha: float, now: float
) -> DeploymentStats:
    """Fold a client-verified outcome (1 = success, 0 = failure, or a score in between) into the
    success rate: what the client saw outranks "it was a 2xx"."""
    value = min(1.0, max(0.0, value))
    return attrs.evolve(
        stats,
        feedback=stats.feedback + 1,
        ewma_success=(1.0 - alpha) * stats.ewma_success + alpha * value,
        last_update=now,
    )


def _keep(stats: DeploymentStats, now: float | None, decay_s: float) -> float:
    """The fraction of the deviation from the prior that survives the idle time."""
    if now is None or stats.last_update is None or now <= stats.last_update:
        return 1.0
    return math.exp(-(now - stats.last_update) / decay_s)


def decay(stats: DeploymentStats, now: float | None, decay_s: float) -> DeploymentStats:
    """Pull success/refusal rates back toward the prior by ``exp(-idle / decay_s)``.

    The result carries ``last_update=now``; because exponential decay is memoryless, decaying in
    several steps equals decaying once. Counters, cost and latency are kept.
    """
    keep = _keep(stats, now, decay_s)
    if keep == 1.0:
        return stats
    return DeploymentStats(
        samples=stats.samples,
        successes=stats.successes,
        refusals=stats.refusals,
        feedback=stats.feedback,
        ewma_cost=stats.ewma_cost,
        ewma_success=PRIOR_SUCCESS + (stats.ewma_success - PRIOR_SUCCESS) * keep,
        ewma_refusal=PRIOR_REFUSAL + (stats.ewma_refusal - PRIOR_REFUSAL) * keep,
        ewma_latency=stats.ewma_latency,
        last_update=now,
    )


def score(stats: DeploymentStats, latency_weight: float = 0.0) -> float:
    """Expected cost per successful outcome (lower is better; see the module docstring).

    No samples yet → 0.0 (optimistic, so an unknown deployment gets tried); tried but never
    succeeded → ``inf``.
    """
    return score_at(stats, None, 1.0, latency_weight)


def score_at(
    stats: DeploymentStats, now: float | None, decay_s: float, latency_weight: float = 0.0
) -> float:
    """``score(decay(stats, now, decay_s))`` without building the decayed copy (hot path)."""
    if stats.samples == 0:
        return 0.0
    keep = _keep(stats, now, decay_s)
    success = PRIOR_SUCCESS + (stats.ewma_success - PRIOR_SUCCESS) * keep
    if stats.successes == 0 or success <= 0.0:
        return math.inf
    refusal = PRIOR_REFUSAL + (stats.ewma_refusal - PRIOR_REFUSAL) * keep
    cost = stats.ewma_cost or 0.0
    value = (cost if cost > COST_FLOOR_USD else COST_FLOOR_USD) / success * (1.0 + refusal)
    if latency_weight > 0.0 and stats.ewma_latency is not None:
        value *= 1.0 + latency_weight * stats.ewma_latency
    return value
