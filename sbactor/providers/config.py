"""Provider configuration: one frozen attrs class per provider ``type``.

The lead's cattrs loader composes these into the root config and discriminates the union on
``type``; validators raise ``ValueError`` with a short message (the loader adds the YAML path).
"""

from __future__ import annotations

from typing import Any, Literal

import attrs


def _positive(_inst: Any, attr: attrs.Attribute[Any], value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attr.name} must be > 0, got {value}")


def _non_negative(_inst: Any, attr: attrs.Attribute[Any], value: float | int) -> None:
    if value < 0:
        raise ValueError(f"{attr.name} must be >= 0, got {value}")


def _rate(_inst: Any, attr: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attr.name} must be between 0 and 1, got {value}")


def _http_url(_inst: Any, attr: attrs.Attribute[Any], value: str) -> None:
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"{attr.name} must start with http:// or https://, got {value!r}")


def _name(_inst: Any, attr: attrs.Attribute[Any], value: str) -> None:
    if not value or not value.strip():
        raise ValueError(f"{attr.name} must not be empty")


def _status(_inst: Any, attr: attrs.Attribute[Any], value: int) -> None:
    if not 400 <= value <= 599:
        raise ValueError(f"{attr.name} must be an HTTP error status (400-599), got {value}")


@attrs.frozen
class OpenAIProviderConfig:
    """Any OpenAI-compatible upstream (OpenAI, Azure-compatible proxies, vLLM, the mock server)."""

    name: str = attrs.field(validator=_name)
    type: Literal["openai"] = "openai"
    base_url: str = attrs.field(default="https://api.openai.com/v1", validator=_http_url)
    api_key: str | None = None
    # Name of an environment variable to read the key from when ``api_key`` is not set.
    api_key_env: str | None = None
    timeout_s: float = attrs.field(default=60.0, validator=_positive)
    connect_timeout_s: float = attrs.field(default=5.0, validator=_positive)
    max_connections: int = attrs.field(default=256, validator=_positive)
    headers: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class AnthropicProviderConfig:
    """Anthropic's Messages API, spoken to in OpenAI chat-completions shape by translation."""

    name: str = attrs.field(validator=_name)
    type: Literal["anthropic"] = "anthropic"
    base_url: str = attrs.field(default="https://api.anthropic.com", validator=_http_url)
    api_key: str | None = None
    api_key_env: str | None = None
    anthropic_version: str = "2023-06-01"
    default_max_tokens: int = attrs.field(default=4096, validator=_positive)
    timeout_s: float = attrs.field(default=60.0, validator=_positive)
    connect_timeout_s: float = attrs.field(default=5.0, validator=_positive)
    max_connections: int = attrs.field(default=256, validator=_positive)
    headers: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class MockProviderConfig:
    """In-process fake upstream for the demo config and tests (no network)."""

    name: str = attrs.field(validator=_name)
    type: Literal["mock"] = "mock"
    latency_ms: float = attrs.field(default=0.0, validator=_non_negative)
    tokens_per_second: float | None = attrs.field(default=None, validator=_positive)
    fail_rate: float = attrs.field(default=0.0, validator=_rate)
    fail_status: int = attrs.field(default=500, validator=_status)
    refusal_rate: float = attrs.field(default=0.0, validator=_rate)
    seed: int | None = None
    reply: str | None = None


ProviderConfig = OpenAIProviderConfig | AnthropicProviderConfig | MockProviderConfig
