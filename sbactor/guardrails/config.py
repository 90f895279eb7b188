"""Guardrail configuration: one attrs class per detector type, plus the optional mesh block.

Detector configs form a union discriminated by ``type``; every regex is checked here (at config
load) so that a bad pattern is a config error with a path, never a 500 on the first request.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import attrs

PII_ENTITIES = ("EMAIL", "PHONE", "CREDIT_CARD", "US_SSN", "IBAN", "IP_ADDRESS")
SECRET_KINDS = (
    "API_KEY",
    "AWS_ACCESS_KEY",
    "GITHUB_TOKEN",
    "SLACK_TOKEN",
    "PRIVATE_KEY",
    "HIGH_ENTROPY",
)


def _positive(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name}: must be > 0, got {value}")


def _non_negative(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name}: must be >= 0, got {value}")


def _unit_interval(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name}: must be between 0 and 1, got {value}")


def _name(_: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise ValueError(
            f"{attribute.name}: expected 1-64 letters, digits, '_', '.' or '-', got {value!r}"
        )


def _regex(where: str, value: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{where}: invalid regular expression {value!r}: {exc}") from None


def _regex_list(_: Any, attribute: attrs.Attribute[Any], value: list[str]) -> None:
    for i, pattern in enumerate(value):
        _regex(f"{attribute.name}[{i}]", pattern)


def _subset(known: tuple[str, ...]) -> Any:
    def check(_: Any, attribute: attrs.Attribute[Any], value: list[str]) -> None:
        for item in value:
            if item not in known:
                raise ValueError(
                    f"{attribute.name}: unknown entity {item!r} (known: {', '.join(known)})"
                )

    return check


@attrs.frozen
class PiiConfig:
    """Email, phone, card (Luhn), US SSN, IBAN (mod-97), IPv4/IPv6."""

    type: Literal["pii"] = "pii"
    name: str | None = attrs.field(default=None, validator=_name)
    entities: list[str] = attrs.field(
        factory=lambda: list(PII_ENTITIES), validator=_subset(PII_ENTITIES)
    )
    redact: bool = True


@attrs.frozen
class SecretsConfig:
    """Known token prefixes, private-key blocks and (optionally) high-entropy strings."""

    type: Literal["secrets"] = "secrets"
    name: str | None = attrs.field(default=None, validator=_name)
    kinds: list[str] = attrs.field(
        factory=lambda: list(SECRET_KINDS), validator=_subset(SECRET_KINDS)
    )
    entropy_threshold: float = attrs.field(default=4.3, validator=_positive)
    entropy_min_length: int = attrs.field(default=24, validator=_positive)
    redact: bool = True


@attrs.frozen
class PromptInjectionConfig:
    """Scored phrasings; ``threshold`` is the combined score at which it flags."""

    type: Literal["prompt_injection"] = "prompt_injection"
    name: str | None = attrs.field(default=None, validator=_name)
    threshold: float = attrs.field(default=0.5, validator=_unit_interval)
    extra_patterns: list[str] = attrs.field(factory=list, validator=_regex_list)
    extra_weight: float = attrs.field(default=0.9, validator=_unit_interval)


@attrs.frozen
class DenylistConfig:
    """Whole words or phrases that must not appear."""

    type: Literal["denylist"] = "denylist"
    name: str | None = attrs.field(default=None, validator=_name)
    words: list[str] = attrs.field(factory=list)
    case_sensitive: bool = False
    label: str = "denylist"
    redact: bool = False

    @words.validator
    def _check_words(self, attribute: attrs.Attribute[Any], value: list[str]) -> None:
        if any(not w.strip() for w in value):
            raise ValueError("words: must not contain empty strings")


@attrs.frozen
class RegexPattern:
    pattern: str = attrs.field()
    label: str = "regex"
    redact: bool = False

    @pattern.validator
    def _check(self, attribute: attrs.Attribute[Any], value: str) -> None:
        _regex("pattern", value)
        if re.compile(value).fullmatch(""):
            raise ValueError(f"pattern: {value!r} matches the empty string")


@attrs.frozen
class RegexConfig:
    """User patterns, each with its own label; ``redact`` ones are masked like PII."""

    type: Literal["regex"] = "regex"
    name: str | None = attrs.field(default=None, validator=_name)
    patterns: list[RegexPattern] = attrs.field(factory=list)
    case_sensitive: bool = True


@attrs.frozen
class LengthConfig:
    """Prompt size guard: estimated tokens (characters / chars_per_token) over ``max_tokens``."""

    type: Literal["length"] = "length"
    name: str | None = attrs.field(default=None, validator=_name)
    max_tokens: int = attrs.field(default=32000, validator=_positive)
    chars_per_token: float = attrs.field(default=4.0, validator=_positive)


@attrs.frozen
class HttpDetectorConfig:
    """An external moderation-style classifier: the expensive kind, bounded by ``timeout_ms``."""

    type: Literal["http"] = "http"
    name: str | None = attrs.field(default=None, validator=_name)
    url: str = attrs.field(kw_only=True)
    timeout_ms: int = attrs.field(default=1000, validator=_positive)
    headers: dict[str, str] = attrs.field(factory=dict)
    label: str = "moderation"

    @url.validator
    def _check_url(self, attribute: attrs.Attribute[Any], value: str) -> None:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"url: expected an http:// or https:// URL, got {value!r}")


DetectorConfig = (
    PiiConfig
    | SecretsConfig
    | PromptInjectionConfig
    | DenylistConfig
    | RegexConfig
    | LengthConfig
    | HttpDetectorConfig
)


def detector_name(cfg: DetectorConfig) -> str:
    return cfg.name or cfg.type


@attrs.frozen
class MeshConfig:
    """Quorum fusion: block at ``block_threshold`` flags (0 = never), redact below it."""

    block_threshold: int = attrs.field(default=2, validator=_non_negative)
    redact_on_flag: bool = True
    latency_budget_ms: float = attrs.field(default=50.0, validator=_positive)
    cache: bool = True
    cache_capacity: int = attrs.field(default=10000, validator=_positive)
    on_detector_error: Literal["fail_open", "fail_closed"] = "fail_open"


@attrs.frozen
class GuardrailsConfig:
    """Input detectors; with ``mesh`` they are fused by quorum, without it the first hit blocks."""

    input: list[DetectorConfig] = attrs.field(factory=list)
    mesh: MeshConfig | None = None

    @input.validator
    def _unique_names(self, attribute: attrs.Attribute[Any], value: list[DetectorConfig]) -> None:
        seen: set[str] = set()
        for i, cfg in enumerate(value):
            name = detector_name(cfg)
            if name in seen:
                raise ValueError(
                    f"input[{i}]: duplicate detector name {name!r} "
                    "(give each one a distinct 'name')"
                )
            seen.add(name)
