"""Routing strategies: pure functions of (candidates, observed stats) → choice.

The caller passes only the candidates that may be used right now (cooled-down deployments already
removed), a monotonically increasing ``counter`` (round-robin position) and its own
``random.Random`` — so every choice is deterministic under test.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol, get_args

import attrs

from sbactor.routing.config import RoutingSettings
from sbactor.routing.stats import EMPTY_STATS, DeploymentStats, score_at

Strategy = Literal[
    "round_robin", "weighted", "lowest_latency", "cheapest", "fallback_chain", "outcome_aware"
]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


class NoCandidates(ValueError):
    """Every deployment of the model is unavailable (all cooled down or none configured)."""


class _Price(Protocol):
    @property
    def input_per_mtok(self) -> float: ...
    @property
    def output_per_mtok(self) -> float: ...


class DeploymentLike(Protocol):
    """The shape of the lead's deployment config (duck-typed so routing does not import it)."""

    @property
    def provider(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def price(self) -> _Price: ...
    @property
    def weight(self) -> float: ...
    @property
    def priority(self) -> int: ...


def deployment_id(model_name: str, provider: str, index: int) -> str:
    """Stable id of a deployment: ``"<public model>/<provider>/<index in the model's list>"``."""
    return f"{model_name}/{provider}/{index}"


@attrs.frozen
class Candidate:
    """One deployment a request for a public model may be sent to."""

    deployment_id: str
    provider: str
    model: str
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    weight: float = 1.0
    priority: int = 0

    @property
    def list_price(self) -> float:
        """Blended list price used by ``cheapest``: input + output USD per million tokens."""
        return self.input_per_mtok + self.output_per_mtok

    @classmethod
    def from_deployment(cls, model_name: str, index: int, dep: DeploymentLike) -> Candidate:
        return cls(
            deployment_id=deployment_id(model_name, dep.provider, index),
            provider=dep.provider,
            model=dep.model,
            input_per_mtok=float(dep.price.input_per_mtok),
            output_per_mtok=float(dep.price.output_per_mtok),
            weight=float(dep.weight),
            priority=int(dep.priority),
        )


def choose(
    strategy: str,
    candidates: Sequence[Candidate],
    stats: Mapping[str, DeploymentStats],
    *,
    counter: int,
    rng: random.Random,
    settings: RoutingSettings,
    now: float | None = None,
) -> Candidate:
    """Pick one candidate. ``now`` (same clock as the stats) enables decay of stale statistics."""
    if not candidates:
        raise NoCandidates("no deployment available")
    if strategy == "round_robin":
        return candidates[counter % len(candidates)]
    if strategy == "weighted":
        return _weighted(candidates, rng)
    if strategy == "lowest_latency":
        return _lowest_latency(candidates, stats, counter)
    if strategy == "cheapest":
        return min(enumerate(candidates), key=lambda ic: (ic[1].list_price, ic[0]))[1]
    if strategy == "fallback_chain":
        return fallback_order(candidates)[0]
    if strategy == "outcome_aware":
        return _outcome_aware(candidates, stats, counter, rng, settings, now)
    raise ValueError(f"unknown routing strategy {strategy!r} (one of {', '.join(STRATEGIES)})")


def fallback_order(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates by ascending ``priority`` (lower = tried first), then configuration order."""
    ranked = sorted(enumerate(candidates), key=lambda ic: (ic[1].priority, ic[0]))
    return [c for _, c in ranked]


def _weighted(candidates: Sequence[Candidate], rng: random.Random) -> Candidate:
    weights = [max(0.0, c.weight) for c in candidates]
    if sum(weights) <= 0.0:
        return rng.choice(candidates)
    return rng.choices(candidates, weights=weights, k=1)[0]


def _lowest_latency(
    candidates: Sequence[Candidate], stats: Mapping[str, DeploymentStats], counter: int
) -> Candidate:
    """Unmeasured deployments first (round-robin among them), then the lowest latency EWMA."""
    unknown = [c for c in candidates if _latency(stats, c) is None]
    if unknown:
        return unknown[counter % len(unknown)]
    return min(enumerate(candidates), key=lambda ic: (_latency(stats, ic[1]), ic[0]))[1]


def _latency(stats: Mapping[str, DeploymentStats], c: Candidate) -> float | None:
    s = stats.get(c.deployment_id)
    return None if s is None else s.ewma_latency


def outcome_scores(
    candidates: Sequence[Candidate],
    stats: Mapping[str, DeploymentStats],
    settings: RoutingSettings,
    now: float | None = None,
) -> list[float]:
    """Each candidate's score after decaying its statistics to ``now``."""
    get, decay_s, weight = stats.get, settings.decay_s, settings.latency_weight
    return [score_at(get(c.deployment_id, EMPTY_STATS), now, decay_s, weight) for c in candidates]


def in_warmup(
    candidates: Sequence[Candidate],
    stats: Mapping[str, DeploymentStats],
    settings: RoutingSettings,
) -> bool:
    need = settings.min_samples
    if need <= 0:
        return False
    get = stats.get
    return any(get(c.deployment_id, EMPTY_STATS).samples < need for c in candidates)


def _outcome_aware(
    candidates: Sequence[Candidate],
    stats: Mapping[str, DeploymentStats],
    counter: int,
    rng: random.Random,
    settings: RoutingSettings,
    now: float | None,
) -> Candidate:
    """Warm-up round-robin; then the best score (near-ties rotate) with ``explore_rate`` of
    traffic spread over the rest, so a demoted deployment keeps being measured."""
    if in_warmup(candidates, stats, settings):
        return candidates[counter % len(candidates)]
    scores = outcome_scores(candidates, stats, settings, now)
    best = min(scores)
    if math.isinf(best):  # nothing has ever succeeded: spread the load, keep probing
        return candidates[counter % len(candidates)]
    limit = best * (1.0 + settings.tie_tolerance)
    near = [c for c, s in zip(candidates, scores, strict=True) if s <= limit]
    if len(near) < len(candidates) and settings.explore_rate > 0.0:
        if rng.random() < settings.explore_rate:
            return _explore(candidates, scores, best, limit, rng)
    return near[counter % len(near)]


def _explore(
    candidates: Sequence[Candidate],
    scores: Sequence[float],
    best: float,
    limit: float,
    rng: random.Random,
) -> Candidate:
    """Pick one of the non-best deployments, weighted by ``best / score``: a near-competitive
    deployment is re-measured more often than one that costs 20x more. Never-succeeded ones
    (score inf) get the smallest finite weight, so they are still probed."""
    others = [(c, s) for c, s in zip(candidates, scores, strict=True) if s > limit]
    finite = [best / s for _, s in others if not math.isinf(s)]
    floor = min(finite) if finite else 1.0
    weights = [floor if math.isinf(s) else best / s for _, s in others]
    if sum(weights) <= 0.0:  # best == 0 (zero costs everywhere): uniform
        return rng.choice(others)[0]
    return rng.choices(others, weights=weights, k=1)[0][0]


@attrs.define(eq=False)
class Router:
    """Holds what ``choose`` needs between calls: a per-model counter and the random source."""

    settings: RoutingSettings = attrs.field(factory=RoutingSettings)
    rng: random.Random = attrs.field(factory=random.Random)
    _counters: dict[str, int] = attrs.field(init=False, factory=dict)

    def pick(
        self,
        model: str,
        strategy: str,
        candidates: Sequence[Candidate],
        stats: Mapping[str, DeploymentStats],
        now: float | None = None,
    ) -> Candidate:
        counter = self._counters.get(model, 0)
        self._counters[model] = counter + 1
        return choose(
            strategy, candidates, stats,
            counter=counter, rng=self.rng, settings=self.settings, now=now,
        )
