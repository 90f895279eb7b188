"""The Gateway: everything a request needs, built once from the config.

It owns the actors (started in the root nursery), the provider clients, the compiled guardrails
and policy, and the routing tables. Handlers receive it and talk to the actors by message.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import trio

from sbactor.actors.budget_tracker import BudgetTracker
from sbactor.actors.feedback_store import FeedbackStore
from sbactor.actors.ledger_writer import LedgerWriter
from sbactor.actors.runtime import Actor, ActorSystem, Supervision
from sbactor.actors.verdict_cache import VerdictCache
from sbactor.auth import KeyStore, Principal
from sbactor.config import Config, JsonlSinkConfig, ModelConfig
from sbactor.errors import GatewayError
from sbactor.guardrails.compiled import CompiledGuardrails
from sbactor.guardrails.config import GuardrailsConfig, PiiConfig, SecretsConfig
from sbactor.http_server import HttpServer, ServerStatistics
from sbactor.ledger.config import LedgerSinkConfig
from sbactor.metrics import Metrics
from sbactor.overload import LoopLag
from sbactor.policy.engine import CompiledPolicy
from sbactor.providers.base import Provider, build_provider
from sbactor.resilience.cooldown import CooldownTracker
from sbactor.resilience.planner import FallbackTable
from sbactor.routing.strategies import Candidate, NoCandidates, deployment_id
from sbactor.state.client import StateClient
from sbactor.usage.sinks import UsageSink, make_jsonl_sink

log = logging.getLogger("sbactor.gateway")


def resolve(data_dir: Path, path: str) -> Path:
    """Relative paths in the config live under the data dir, so one flag moves all state."""
    p = Path(path)
    return p if p.is_absolute() else data_dir / p


def build_candidates(model: ModelConfig) -> list[Candidate]:
    return [
        Candidate(
            deployment_id=deployment_id(model.name, d.provider, i),
            provider=d.provider,
            model=d.model or model.name,
            input_per_mtok=d.price.input_per_mtok,
            output_per_mtok=d.price.output_per_mtok,
            weight=d.weight,
            priority=d.priority,
        )
        for i, d in enumerate(model.deployments)
    ]


def worst_case_usd(candidates: list[Candidate], tokens_in: int, tokens_out: int) -> float | None:
    """The dearest deployment's price for this many tokens: what a reservation must cover."""
    if not candidates:
        return None
    return max(
        (c.input_per_mtok * tokens_in + c.output_per_mtok * tokens_out) / 1_000_000
        for c in candidates
    )


def default_redactor() -> CompiledGuardrails:
    """What the policy's ``redact`` uses when no guardrails are configured: PII and secrets."""
    return CompiledGuardrails.from_config(GuardrailsConfig(input=[PiiConfig(), SecretsConfig()]))


@attrs.define(eq=False)
class Gateway:
    config: Config
    data_dir: Path
    keys: KeyStore
    providers: dict[str, Provider]
    metrics: Metrics
    actors: ActorSystem
    feedback: FeedbackStore
    budgets: BudgetTracker | None
    verdict_cache: VerdictCache | None
    ledger: LedgerWriter | None
    sinks: list[UsageSink]
    guardrails: CompiledGuardrails | None
    redactor: CompiledGuardrails
    policy: CompiledPolicy | None
    candidates: dict[str, list[Candidate]]
    models: dict[str, ModelConfig]
    cooldowns: CooldownTracker
    fallbacks: FallbackTable
    rng: random.Random = attrs.field(factory=random.Random)
    http: Any = None
    draining: bool = False
    ready: bool = False
    bound: str | None = None
    in_flight: int = 0
    loop_lag: LoopLag = attrs.field(factory=LoopLag)
    started_at: float = attrs.field(factory=time.time)
    state: StateClient | None = None  # state.backend redis: the shared Redis
    http_server: HttpServer | None = None  # set by run_gateway: its statistics go to /metrics

    @classmethod
    def build(
        cls,
        config: Config,
        data_dir: Path,
        *,
        ledger_recover: Literal["refuse", "quarantine"] = "refuse",
    ) -> Gateway:
        metrics = Metrics()
        actors = ActorSystem()
        sinks: list[UsageSink] = []
        ledger: LedgerWriter | None = None
        call_timeout = config.actors.call_timeout_s
        # The ledger starts first and stops last: everything else may still produce events.
        for sink_cfg in config.usage_sinks:
            if isinstance(sink_cfg, LedgerSinkConfig):
                ledger = LedgerWriter.from_config(
                    sink_cfg, resolve(data_dir, sink_cfg.path), recover=ledger_recover
                )
                actors.add(ledger)
                sinks.append(ledger)
        for sink_cfg in config.usage_sinks:
            if isinstance(sink_cfg, JsonlSinkConfig):
                sink = make_jsonl_sink(resolve(data_dir, sink_cfg.path), config.actors.sink_mailbox)
                actors.add(sink)
                sinks.append(sink)
        state = StateClient(config.state) if config.state.backend == "redis" else None
        if state is not None:
            from sbactor.state.feedback import SharedFeedbackStore

            feedback: FeedbackStore = SharedFeedbackStore(
                name="feedback_store",
                capacity=config.actors.feedback_mailbox,
                supervision=Supervision.RESTART,
                settings=config.routing,
                call_timeout_s=call_timeout,
                state=state,
                refresh_s=config.state.local_cache_s,
                request_ttl_s=config.state.feedback_ttl_s,
            )
        else:
            feedback = FeedbackStore(
                name="feedback_store",
                capacity=config.actors.feedback_mailbox,
                supervision=Supervision.RESTART,
                settings=config.routing,
                call_timeout_s=call_timeout,
            )
        actors.add(feedback)
        budgets: BudgetTracker | None = None
        candidates = {m.name: build_candidates(m) for m in config.models}
        if config.budgets or config.rate_limits:
            tracker_class = BudgetTracker
            if state is not None:
                from sbactor.state.budget import SharedBudgetTracker

                tracker_class = SharedBudgetTracker
            budgets = tracker_class.from_config(
                config.budgets,
                config.rate_limits,
                config.budget_settings,
                data_dir,
                capacity=config.actors.budget_mailbox,
                estimator=lambda model, tokens_in, tokens_out: worst_case_usd(
                    candidates.get(model, []), tokens_in, tokens_out
                ),
            )
            if state is not None:
                budgets.state = state  # type: ignore[attr-defined]
                budgets.fail_open = config.state.on_unavailable == "fail_open"  # type: ignore[attr-defined]
                budgets.snapshot_file = None  # the counters live in redis
            actors.add(budgets)
        guardrails = (
            CompiledGuardrails.from_config(config.guardrails) if config.guardrails else None
        )
        verdict_cache: VerdictCache | None = None
        mesh = guardrails.mesh if guardrails is not None else None
        if mesh is not None and mesh.cache:
            if state is not None and config.state.shared_verdict_cache:
                from sbactor.state.verdict_cache import SharedVerdictCache

                verdict_cache = SharedVerdictCache(
                    name="verdict_cache",
                    capacity=config.actors.verdict_cache_mailbox,
                    max_entries=mesh.cache_capacity,
                    state=state,
                    ttl_s=config.state.verdict_cache_ttl_s,
                )
            else:
                verdict_cache = VerdictCache(
                    name="verdict_cache",
                    capacity=config.actors.verdict_cache_mailbox,
                    max_entries=mesh.cache_capacity,
                )
            actors.add(verdict_cache)
        models = {m.name: m for m in config.models}
        policy = CompiledPolicy.compile(config.policy, set(models)) if config.policy else None
        gateway = cls(
            config=config,
            data_dir=data_dir,
            keys=KeyStore.from_config(config.keys, required=config.server.auth == "keys"),
            providers={p.name: build_provider(p) for p in config.providers},
            metrics=metrics,
            actors=actors,
            feedback=feedback,
            budgets=budgets,
            verdict_cache=verdict_cache,
            ledger=ledger,
            sinks=sinks,
            guardrails=guardrails,
            redactor=guardrails or default_redactor(),
            policy=policy,
            candidates=candidates,
            models=models,
            cooldowns=CooldownTracker.from_config(config.resilience),
            fallbacks=FallbackTable.from_models(config.models),
            state=state,
        )
        metrics.watch_actors(actors.statistics)
        metrics.watch_server(gateway.server_statistics)
        return gateway

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        if self.config.server.shed_loop_lag_ms > 0:
            await nursery.start(self.loop_lag.run)
        if self.state is not None:
            await nursery.start(self.state.run)
        await self.actors.start_all(nursery)
        if self.guardrails is not None and self.guardrails.expensive:
            import httpx2

            self.http = httpx2.AsyncClient(timeout=10.0)

    async def stop(self) -> None:
        self.loop_lag.stop()
        await self.actors.stop_all()
        if self.state is not None:
            self.state.stop()

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()
        if self.http is not None:
            await self.http.aclose()

    # ---- requests ----------------------------------------------------------------------------

    def authenticate(self, headers: Mapping[str, str] | Any) -> Principal:
        principal = self.keys.authenticate(headers.get("authorization"), headers.get("x-api-key"))
        if principal is None:
            raise GatewayError(
                401,
                "invalid or missing API key: send 'Authorization: Bearer <key>'",
                "authentication_error",
                "invalid_api_key",
            )
        return principal

    @property
    def lag_shed_floor(self) -> int:
        """Lag shedding never takes in-flight requests below this: they are the goodput. Without
        a floor, a storm of cheap-to-refuse requests keeps the loop lagging and the gateway
        sheds everything, serving nothing (measured: 9 req/s served of 890 possible)."""
        return max(4, self.config.server.max_in_flight // 8)

    def admission(self) -> GatewayError | None:
        """Refuse new paid work before any upstream call when we could not record it."""
        if self.draining:
            return GatewayError(503, "gateway is shutting down", "service_unavailable", "draining")
        shed_ms = self.config.server.shed_loop_lag_ms
        if (
            shed_ms
            and self.loop_lag.lag_s * 1000 > shed_ms
            and self.in_flight >= self.lag_shed_floor
        ):
            return GatewayError(
                503,
                f"gateway overloaded: event loop {self.loop_lag.lag_s * 1000:.0f} ms behind",
                "service_unavailable",
                "overloaded",
                headers={"retry-after": "1"},
            )
        for sink in self.sinks:
            reason = sink.admission()
            if reason:
                return GatewayError(
                    503,
                    f"usage recording unavailable: {reason}",
                    "service_unavailable",
                    "ledger_unavailable",
                    headers={"retry-after": "1"},
                )
        if self.in_flight >= self.config.server.max_in_flight:
            return GatewayError(
                503,
                "gateway overloaded: too many requests in flight",
                "service_unavailable",
                "overloaded",
                headers={"retry-after": "1"},
            )
        return None

    def route(
        self,
        model: str,
        *,
        exclude: frozenset[str] = frozenset(),
        exclude_providers: frozenset[str] = frozenset(),
        prefer: str | None = None,
    ) -> Candidate | None:
        """The deployment to try for ``model``: the preferred one (a retry) unless it is cooling
        down, else the strategy's choice among the allowed ones that are not cooling down."""
        now = trio.current_time()
        allowed = [
            c
            for c in self.candidates.get(model, [])
            if c.deployment_id not in exclude and c.provider not in exclude_providers
        ]
        usable = [c for c in allowed if not self.cooldowns.is_cooling(c.deployment_id, now)]
        if prefer is not None:
            for c in usable:
                if c.deployment_id == prefer:
                    return c
        if not usable:
            usable = allowed  # everything cools down: better to try than to refuse outright
        try:
            return self.feedback.route(model, self.models[model].routing, usable, note=False)
        except NoCandidates:
            return None

    # ---- views -------------------------------------------------------------------------------

    def server_statistics(self) -> ServerStatistics | None:
        return self.http_server.statistics() if self.http_server is not None else None

    def actor_statistics(self) -> list[dict[str, Any]]:
        return [attrs.asdict(s) for s in self.actors.statistics()]

    def unready_reasons(self) -> list[str]:
        reasons = []
        if not self.ready:
            reasons.append("starting")
        if self.draining:
            reasons.append("draining")
        for actor in self.actors.actors:
            if not actor.statistics().running and self.ready:
                reasons.append(f"actor {actor.name} is not running")
        for sink in self.sinks:
            reason = sink.admission()
            if reason:
                reasons.append(reason)
        if self.config.state.on_unavailable == "fail_closed":
            reasons += self.degraded_reasons()
        return reasons

    def degraded_reasons(self) -> list[str]:
        """Shared state unavailable (with fail_open the gateway stays ready but degraded)."""
        reason = self.state.unavailable_reason() if self.state is not None else None
        return [reason] if reason else []

    def routing_view(self) -> Any:
        view = self.feedback.routing_view(
            self.candidates, {m.name: m.routing for m in self.config.models}
        )
        now = trio.current_time()
        view["cooldowns"] = self.cooldowns.snapshot(now)
        return view

    async def budget_view(self) -> Any:
        if self.budgets is None:
            return []
        return await self.budgets.admin_snapshot()

    def all_actors(self) -> list[Actor]:
        return list(self.actors.actors)
