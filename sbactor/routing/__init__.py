"""Routing: strategies (pure), outcome statistics and scoring (pure), settings."""

from sbactor.routing.config import RoutingSettings
from sbactor.routing.share import ShareWindow
from sbactor.routing.stats import (
    COST_FLOOR_USD,
    EMPTY_STATS,
    DeploymentStats,
    Outcome,
    apply_feedback,
    decay,
    score,
    score_at,
    update_stats,
)
from sbactor.routing.strategies import (
    STRATEGIES,
    Candidate,
    NoCandidates,
    Router,
    Strategy,
    choose,
    deployment_id,
    fallback_order,
    in_warmup,
    outcome_scores,
)

__all__ = [
    "COST_FLOOR_USD",
    "EMPTY_STATS",
    "STRATEGIES",
    "Candidate",
    "DeploymentStats",
    "NoCandidates",
    "Outcome",
    "Router",
    "RoutingSettings",
    "ShareWindow",
    "Strategy",
    "apply_feedback",
    "choose",
    "decay",
    "deployment_id",
    "fallback_order",
    "in_warmup",
    "outcome_scores",
    "score",
    "score_at",
    "update_stats",
]
