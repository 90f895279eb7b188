"""Budget and rate-limit configuration (``budgets:``, ``rate_limits:``, ``budget_settings:``).

Frozen attrs classes with plain field types; validators raise ``ValueError`` with a short message
and the lead's loader adds the YAML path.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

Scope = Literal["global", "key", "user", "team", "model", "tag"]
Window = Literal["minute", "hour", "day", "month", "total"]
RateScope = Literal["key", "user", "team"]


def _positive(_inst: Any, attr: attrs.Attribute[Any], value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attr.name} must be > 0, got {value}")


def _threshold(_inst: Any, attr: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{attr.name} must be in (0, 1], got {value}")


def _alpha(_inst: Any, attr: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{attr.name} must be in (0, 1], got {value}")


def _non_empty(_inst: Any, attr: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not value.strip():
        raise ValueError(f"{attr.name} must not be empty")


@attrs.frozen
class SoftLandingConfig:
    """Degrade before the cap: warn past ``warn_at``, rewrite the model past ``downgrade_at``."""

    warn_at: float = attrs.field(default=0.8, validator=_threshold)
    downgrade_at: float = attrs.field(default=0.95, validator=_threshold)
    # None: the gateway picks the cheapest deployment serving the same surface.
    downgrade_to: str | None = attrs.field(default=None, validator=_non_empty)
    # "forecast": act on max(current fraction, forecast fraction at the window's end).
    act_on: Literal["current", "forecast"] = "current"

    def __attrs_post_init__(self) -> None:
        if self.warn_at > self.downgrade_at:
            raise ValueError(
                f"warn_at ({self.warn_at}) must not be above downgrade_at ({self.downgrade_at})"
            )


@attrs.frozen
class BudgetConfig:
    """One budget: a cap on cost and/or tokens per scope value and window."""

    scope: Scope
    # None: every value of the scope gets its own counter; set: one counter for matching values
    # (exact, or a shell-style glob such as ``gpt-4*``).
    match: str | None = attrs.field(default=None, validator=_non_empty)
    window: Window = "day"
    rolling: bool = False
    max_cost_usd: float | None = attrs.field(default=None, validator=_positive)
    max_tokens: int | None = attrs.field(default=None, validator=_positive)
    soft_landing: SoftLandingConfig | None = None
    name: str | None = attrs.field(default=None, validator=_non_empty)

    def __attrs_post_init__(self) -> None:
        if self.max_cost_usd is None and self.max_tokens is None:
            raise ValueError("a budget needs max_cost_usd and/or max_tokens")
        if self.rolling and self.window == "total":
            raise ValueError("a 'total' window cannot be rolling")
        if self.scope == "global" and self.match is not None:
            raise ValueError("a global budget takes no match")

    @property
    def label(self) -> str:
        """Stable identity of the budget (counters and snapshots are keyed by it)."""
        if self.name:
            return self.name
        where = self.scope if self.match is None else f"{self.scope}:{self.match}"
        return f"{where}/{'rolling-' if self.rolling else ''}{self.window}"


@attrs.frozen
class RateLimitConfig:
    """Requests and tokens per minute per key, user or team (sliding 60 s window)."""

    scope: RateScope
    match: str | None = attrs.field(default=None, validator=_non_empty)
    rpm: int | None = attrs.field(default=None, validator=_positive)
    tpm: int | None = attrs.field(default=None, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.rpm is None and self.tpm is None:
            raise ValueError("a rate limit needs rpm and/or tpm")

    @property
    def label(self) -> str:
        where = self.scope if self.match is None else f"{self.scope}:{self.match}"
        return f"{where}/minute"


@attrs.frozen
class BudgetSettings:
    """Global knobs of the BudgetTracker."""

    # Relative to the data dir; "" disables persistence.
    snapshot_path: str = "budgets.json"
    snapshot_interval_s: float = attrs.field(default=30.0, validator=_positive)
    # EWMA weight of the newest burn-rate sample (one sample per forecast interval).
    forecast_alpha: float = attrs.field(default=0.3, validator=_alpha)
    # Length of a burn-rate sample; capped at a tenth of the window.
    forecast_interval_s: float = attrs.field(default=60.0, validator=_positive)
    # Closed samples needed before the forecast may exceed the current fraction.
    forecast_min_samples: int = attrs.field(default=3, validator=_positive)
    # Safety net: a reservation never reconciled is released after this long.
    reservation_ttl_s: float = attrs.field(default=900.0, validator=_positive)
