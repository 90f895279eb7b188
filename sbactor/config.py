"""The gateway's configuration: one YAML file loaded into frozen attrs classes.

Each concern owns its config classes (``sbactor/<concern>/config.py``); this module composes them
into the root ``Config``, loads YAML with ``${ENV}`` substitution and checks what only the whole
config can know (provider names, model references, duplicate names).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from sbactor.budget.config import BudgetConfig, BudgetSettings, RateLimitConfig
from sbactor.config_load import (
    ConfigError,
    env_substituted,
    load_yaml_text,
    make_converter,
    structure,
)
from sbactor.guardrails.config import GuardrailsConfig
from sbactor.ledger.config import LedgerSinkConfig
from sbactor.policy.config import PolicyConfig
from sbactor.providers.config import ProviderConfig
from sbactor.resilience.config import ResilienceConfig
from sbactor.routing.config import RoutingSettings

__all__ = ["Config", "ConfigError", "load_config", "parse_config"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _positive(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"must be > 0, got {value}")


def _non_negative(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")


def _bind(_: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")


@attrs.frozen
class ServerConfig:
    bind: str = attrs.field(default="127.0.0.1:8080", validator=_bind)
    admin_key: str | None = None
    auth: Literal["keys", "off"] = "keys"
    max_body_bytes: int = attrs.field(default=4 * 1024 * 1024, validator=_positive)
    shutdown_grace_s: float = attrs.field(default=10.0, validator=_non_negative)
    backlog: int = attrs.field(default=2048, validator=_positive)
    max_in_flight: int = attrs.field(default=1024, validator=_positive)
    #: open client connections; more are answered 503 and closed (cheaply, before parsing)
    max_connections: int = attrs.field(default=2048, validator=_positive)
    #: idle time between requests on a keep-alive connection before it is closed
    keep_alive_s: float = attrs.field(default=75.0, validator=_positive)
    #: from a request's first byte to its last: slower is 408 (a slow-loris client holds a
    #: connection slot, not the gateway)
    request_read_s: float = attrs.field(default=30.0, validator=_positive)
    #: for each 64 KiB of a response to be taken by the client; a client that stops reading
    #: is disconnected after this
    write_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    #: request line + headers; larger is 431
    max_header_bytes: int = attrs.field(default=64 * 1024, validator=_positive)
    #: shed new requests (503) while the event loop lags more than this; 0 = off
    shed_loop_lag_ms: float = attrs.field(default=0.0, validator=_non_negative)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = False
    # Processes serving one port (SO_REUSEPORT); > 1 needs state.backend redis.
    workers: int = attrs.field(default=1, validator=_positive)


@attrs.frozen
class KeyConfig:
    id: str
    key_sha256: str = attrs.field()
    user: str | None = None
    team: str | None = None
    tier: str = "default"
    tags: list[str] = attrs.field(factory=list)

    @key_sha256.validator
    def _check_hash(self, attribute: attrs.Attribute[str], value: str) -> None:
        if not _HEX64.match(value):
            raise ValueError("expected the SHA-256 of the key as 64 lower-case hex characters")


@attrs.frozen
class PriceConfig:
    input_per_mtok: float = attrs.field(default=0.0, validator=_non_negative)
    output_per_mtok: float = attrs.field(default=0.0, validator=_non_negative)


@attrs.frozen
class DeploymentConfig:
    provider: str
    model: str | None = None
    price: PriceConfig = attrs.field(factory=PriceConfig)
    weight: float = attrs.field(default=1.0, validator=_non_negative)
    priority: int = 0
    context_window: int | None = None


RoutingStrategy = Literal[
    "round_robin", "weighted", "lowest_latency", "cheapest", "fallback_chain", "outcome_aware"
]


@attrs.frozen
class ModelConfig:
    name: str
    deployments: list[DeploymentConfig] = attrs.field()
    surface: Literal["chat", "embeddings"] = "chat"
    routing: RoutingStrategy = "round_robin"
    context_window: int = attrs.field(default=128_000, validator=_positive)
    max_output_tokens: int = attrs.field(default=4096, validator=_positive)
    fallbacks: list[str] = attrs.field(factory=list)
    context_window_fallbacks: list[str] = attrs.field(factory=list)
    content_policy_fallbacks: list[str] = attrs.field(factory=list)

    @deployments.validator
    def _at_least_one(self, attribute: attrs.Attribute[Any], value: list[Any]) -> None:
        if not value:
            raise ValueError("a model needs at least one deployment")


@attrs.frozen
class JsonlSinkConfig:
    type: Literal["jsonl"]
    path: str = "usage.jsonl"


UsageSinkConfig = JsonlSinkConfig | LedgerSinkConfig


@attrs.frozen
class ActorsConfig:
    feedback_mailbox: int = attrs.field(default=4096, validator=_positive)
    budget_mailbox: int = attrs.field(default=4096, validator=_positive)
    verdict_cache_mailbox: int = attrs.field(default=4096, validator=_positive)
    sink_mailbox: int = attrs.field(default=4096, validator=_positive)
    call_timeout_s: float = attrs.field(default=5.0, validator=_positive)


def _redis_url(_: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {value!r}")


@attrs.frozen
class StateConfig:
    """Where budgets, rate limits and routing feedback live: this process (``memory``) or a
    Redis shared by every worker and instance (``redis``; see docs/scale-out.md)."""

    backend: Literal["memory", "redis"] = "memory"
    url: str = attrs.field(default="redis://127.0.0.1:6379/0", validator=_redis_url)
    key_prefix: str = "sbactor:"
    # Redis down or slow: refuse paid requests with 503, or serve on local counters.
    on_unavailable: Literal["fail_closed", "fail_open"] = "fail_closed"
    timeout_s: float = attrs.field(default=0.5, validator=_positive)
    # How long a process reuses shared routing statistics before reading them again.
    local_cache_s: float = attrs.field(default=1.0, validator=_non_negative)
    # How long any instance can resolve POST /v1/feedback for a request another one served.
    feedback_ttl_s: int = attrs.field(default=86400, validator=_positive)
    # Guardrail verdicts shared through Redis too (second tier behind the local LRU).
    shared_verdict_cache: bool = False
    verdict_cache_ttl_s: int = attrs.field(default=3600, validator=_positive)


@attrs.frozen
class Config:
    server: ServerConfig = attrs.field(factory=ServerConfig)
    keys: list[KeyConfig] = attrs.field(factory=list)
    providers: list[ProviderConfig] = attrs.field(factory=list)
    models: list[ModelConfig] = attrs.field(factory=list)
    routing: RoutingSettings = attrs.field(factory=RoutingSettings)
    resilience: ResilienceConfig = attrs.field(factory=ResilienceConfig)
    guardrails: GuardrailsConfig | None = None
    budgets: list[BudgetConfig] = attrs.field(factory=list)
    rate_limits: list[RateLimitConfig] = attrs.field(factory=list)
    budget_settings: BudgetSettings = attrs.field(factory=BudgetSettings)
    policy: PolicyConfig | None = None
    usage_sinks: list[UsageSinkConfig] = attrs.field(factory=list)
    actors: ActorsConfig = attrs.field(factory=ActorsConfig)
    state: StateConfig = attrs.field(factory=StateConfig)

    def model(self, name: str) -> ModelConfig | None:
        return self._models_by_name.get(name)

    @property
    def _models_by_name(self) -> dict[str, ModelConfig]:
        return {m.name: m for m in self.models}


_CONVERTER = make_converter()


def parse_config(
    data: Any, *, source: str = "<config>", env: Mapping[str, str] | None = None
) -> Config:
    """Structure already-parsed YAML into a checked ``Config`` (raises ``ConfigError``)."""
    data = env_substituted(data, env)
    config: Config = structure(data, Config, _CONVERTER)
    problems = cross_check(config)
    if problems:
        raise ConfigError(problems)
    return config


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror or exc}"]) from None
    return parse_config(load_yaml_text(text, str(path)), source=str(path), env=env)


def cross_check(config: Config) -> list[str]:
    """Checks across sections: references must name things that exist."""
    problems: list[str] = []
    providers = [p.name for p in config.providers]
    problems += _duplicates(providers, "providers", "provider")
    models = [m.name for m in config.models]
    problems += _duplicates(models, "models", "model")
    problems += _duplicates([k.id for k in config.keys], "keys", "key id")
    problems += _duplicates([k.key_sha256 for k in config.keys], "keys", "key hash")
    known_providers = ", ".join(providers) or "none configured"
    for i, model in enumerate(config.models):
        for j, dep in enumerate(model.deployments):
            if dep.provider not in providers:
                problems.append(
                    f"models[{i}].deployments[{j}].provider: unknown provider {dep.provider!r} "
                    f"(known: {known_providers})"
                )
        for field in ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks"):
            for k, target in enumerate(getattr(model, field)):
                if target not in models:
                    problems.append(f"models[{i}].{field}[{k}]: unknown model {target!r}")
                elif target == model.name:
                    problems.append(f"models[{i}].{field}[{k}]: a model cannot fall back to itself")
    for i, budget in enumerate(config.budgets):
        landing = budget.soft_landing
        if landing is not None and landing.downgrade_to and landing.downgrade_to not in models:
            problems.append(
                f"budgets[{i}].soft_landing.downgrade_to: unknown model {landing.downgrade_to!r}"
            )
    if config.policy is not None:
        from sbactor.policy.engine import check_on_error, check_policy

        problems += [f"policy.expression: {p}" for p in check_policy(config.policy, set(models))]
        problems += [f"policy.{p}" for p in check_on_error(config.policy, set(models))]
    if config.server.workers > 1 and config.state.backend != "redis":
        problems.append(
            f"server.workers: {config.server.workers} workers need state.backend redis "
            "(with memory state every worker would keep its own budgets and rate limits)"
        )
    if config.state.backend == "redis":
        for i, budget in enumerate(config.budgets):
            if budget.rolling:
                problems.append(
                    f"budgets[{i}].rolling: rolling windows are not supported with "
                    "state.backend redis (use a calendar window)"
                )
    sinks = [type(s).__name__ for s in config.usage_sinks]
    if sinks.count("LedgerSinkConfig") > 1:
        problems.append("usage_sinks: at most one ledger sink")
    return problems


def _duplicates(names: list[str], section: str, what: str) -> list[str]:
    seen: set[str] = set()
    problems = []
    for i, name in enumerate(names):
        if name in seen:
            problems.append(f"{section}[{i}]: duplicate {what} {name!r}")
        seen.add(name)
    return problems


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
