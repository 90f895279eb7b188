"""Routing settings: the knobs of the outcome-aware strategy and the FeedbackStore.

Plain attrs classes so the lead's cattrs loader can compose them into the root config
(it adds the YAML path to the ``ValueError`` messages raised here).
"""

from __future__ import annotations

from typing import Any

import attrs


def _fraction(_inst: Any, attr: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attr.name} must be between 0 and 1, got {value}")


def _open_fraction(_inst: Any, attr: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{attr.name} must be > 0 and <= 1, got {value}")


def _positive(_inst: Any, attr: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attr.name} must be > 0, got {value}")


def _non_negative(_inst: Any, attr: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attr.name} must be >= 0, got {value}")


@attrs.frozen
class RoutingSettings:
    """Outcome-aware routing knobs (see docs/outcome-aware-routing.md).

    * ``alpha`` — EWMA weight of the newest observation.
    * ``min_samples`` — warm-up: round-robin until every candidate has this many outcomes.
    * ``explore_rate`` — share of traffic sent to the non-best deployments so they can recover.
    * ``decay_s`` — time constant with which stale success/refusal rates return to the prior.
    * ``latency_weight`` — score multiplier per second of latency EWMA (0 = ignore latency).
    * ``tie_tolerance`` — deployments whose score is within this fraction of the best share
      traffic round-robin instead of one of them taking it all.
    * ``feedback_capacity`` — how many recent request ids accept ``POST /v1/feedback``.
    * ``share_window`` — how many recent choices per model ``/admin/routing`` counts for shares.
    """

    alpha: float = attrs.field(default=0.2, validator=_open_fraction)
    min_samples: int = attrs.field(default=5, validator=_non_negative)
    explore_rate: float = attrs.field(default=0.05, validator=_fraction)
    decay_s: float = attrs.field(default=300.0, validator=_positive)
    latency_weight: float = attrs.field(default=0.0, validator=_non_negative)
    tie_tolerance: float = attrs.field(default=0.05, validator=_fraction)
    feedback_capacity: int = attrs.field(default=100_000, validator=_positive)
    share_window: int = attrs.field(default=1000, validator=_positive)
