"""Resilience config: retry counts per failure cause, backoff, deadline, cooldowns, streams."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from sbactor.resilience.failure import FailureClass

__all__ = ["ResilienceConfig", "RetryPolicyConfig"]

_MAX_RETRIES = 20


def _count(_: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_RETRIES:
        raise ValueError(
            f"{attribute.name} must be a whole number from 0 to {_MAX_RETRIES}, got {value!r}"
        )


def _positive(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


def _non_negative(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


@attrs.frozen
class RetryPolicyConfig:
    """Retries (after the first attempt) per failure cause, per model tried."""

    timeout: int = attrs.field(default=2, validator=_count)
    rate_limit: int = attrs.field(default=3, validator=_count)
    server_error: int = attrs.field(default=2, validator=_count)
    connection: int = attrs.field(default=2, validator=_count)
    context_window: int = attrs.field(default=0, validator=_count)
    content_policy: int = attrs.field(default=0, validator=_count)
    auth: int = attrs.field(default=0, validator=_count)
    bad_request: int = attrs.field(default=0, validator=_count)
    not_found: int = attrs.field(default=0, validator=_count)
    unknown: int = attrs.field(default=0, validator=_count)

    def retries_for(self, cls: FailureClass) -> int:
        count: int = getattr(self, cls.value)
        return count


@attrs.frozen
class ResilienceConfig:
    """How the gateway treats upstream failures. ``enabled: false`` = one attempt, no fallbacks."""

    enabled: bool = True
    retry_policy: RetryPolicyConfig = attrs.field(factory=RetryPolicyConfig)
    backoff_base_s: float = attrs.field(default=0.25, validator=_positive)
    backoff_max_s: float = attrs.field(default=8.0, validator=_positive)
    max_retry_after_s: float = attrs.field(default=30.0, validator=_non_negative)
    request_deadline_s: float = attrs.field(default=120.0, validator=_positive)
    allowed_fails: int = attrs.field(default=3, validator=_positive)
    fail_window_s: float = attrs.field(default=60.0, validator=_positive)
    cooldown_s: float = attrs.field(default=30.0, validator=_non_negative)
    stream_idle_timeout_s: float = attrs.field(default=60.0, validator=_positive)
    on_context_window: Literal["fallback", "compress", "fail"] = "fallback"

    def __attrs_post_init__(self) -> None:
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_base_s "
                f"({self.backoff_base_s})"
            )
