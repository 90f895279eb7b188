"""The end of every request: one usage event, handed to every sink and to the feedback loop.

``finish`` runs exactly once per request (``ctx.finalized``), on success, failure, refusal and
client disconnect alike, so a budget reservation never leaks and no spend goes unrecorded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import trio

from sbactor.errors import GatewayError
from sbactor.gateway import Gateway
from sbactor.pipeline.context import RequestContext
from sbactor.resilience.failure import FailureClass
from sbactor.routing.stats import Outcome
from sbactor.routing.strategies import Candidate
from sbactor.usage.event import EventKind, UsageEvent, utc_now_rfc3339

log = logging.getLogger("sbactor.usage")


def cost_of(candidate: Candidate | None, prompt_tokens: int, completion_tokens: int) -> float:
    if candidate is None:
        return 0.0
    return (
        prompt_tokens * candidate.input_per_mtok + completion_tokens * candidate.output_per_mtok
    ) / 1_000_000


def usage_numbers(usage: Mapping[str, Any] | None) -> tuple[int, int] | None:
    if not isinstance(usage, Mapping):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


async def finish(
    gateway: Gateway,
    ctx: RequestContext,
    *,
    kind: EventKind,
    status: int,
    candidate: Candidate | None = None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    usage_estimated: bool = False,
    finish_reason: str | None = None,
    refusal: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    provider_refused: bool = False,
    client_disconnected: bool = False,
) -> UsageEvent:
    """Build the event and deliver it. Shielded: a disconnect must not lose the record."""
    if ctx.finalized:
        raise RuntimeError("request finalized twice")
    ctx.finalized = True
    cost = cost_of(candidate, prompt_tokens, completion_tokens)
    event = UsageEvent(
        request_id=ctx.request_id,
        dedup_key=ctx.uid,
        kind=kind,
        time=utc_now_rfc3339(),
        principal=ctx.principal.as_dict(),
        surface=ctx.surface,
        requested_model=ctx.requested_model,
        status=status,
        routed_model=ctx.model.name if candidate is not None else None,
        provider=candidate.provider if candidate is not None else None,
        deployment=candidate.deployment_id if candidate is not None else None,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        usage_estimated=usage_estimated,
        cost_usd=round(cost, 10),
        latency_ms=round(ctx.elapsed_ms(), 3),
        upstream_latency_ms=round(ctx.upstream_s * 1000, 3),
        overhead_ms=round(ctx.overhead_ms(), 3),
        stream=ctx.stream,
        finish_reason=finish_reason,
        attempts=tuple(a.to_dict() for a in ctx.attempts),
        tags=tuple(ctx.tags),
        sink_tag=ctx.sink_tag,
        refusal=refusal,
        error=error,
        guardrails=ctx.guardrails,
        budget=ctx.budget,
        policy=ctx.policy,
        client_disconnected=client_disconnected,
    )
    with trio.CancelScope(shield=True):
        await _deliver(gateway, ctx, event, candidate, provider_refused)
    return event


async def _deliver(
    gateway: Gateway,
    ctx: RequestContext,
    event: UsageEvent,
    candidate: Candidate | None,
    provider_refused: bool,
) -> None:
    if ctx.reserved and gateway.budgets is not None:
        ctx.reserved = False
        await gateway.budgets.reconcile(ctx.uid, event.cost_usd, event.total_tokens)
    if event.kind in ("completion", "error") and not event.client_disconnected:
        _feed_routing(gateway, ctx, event, candidate, provider_refused)
    metrics = gateway.metrics
    if event.cost_usd:
        metrics.cost.labels(event.routed_model or event.requested_model).inc(event.cost_usd)
    if event.total_tokens:
        model = event.routed_model or event.requested_model
        metrics.tokens.labels(model, "prompt").inc(event.prompt_tokens)
        metrics.tokens.labels(model, "completion").inc(event.completion_tokens)
    if event.kind == "refusal" and event.refusal:
        metrics.refusals.labels(str(event.refusal.get("stage"))).inc()
    data = event.to_dict()
    not_durable: str | None = None
    for sink in gateway.sinks:
        try:
            await sink.record(data)
        except Exception as exc:
            log.exception("usage sink failed", extra={"sink": getattr(sink, "name", "?")})
            if getattr(sink, "durability", None) == "strict":
                not_durable = str(exc)
    if not_durable is not None and not event.client_disconnected:
        # durability: strict promises the last byte only once the entry is on disk.
        raise GatewayError(
            503,
            f"usage recording failed: {not_durable}",
            "service_unavailable",
            "ledger_unavailable",
            headers={"retry-after": "1"},
        )


def _feed_routing(
    gateway: Gateway,
    ctx: RequestContext,
    event: UsageEvent,
    candidate: Candidate | None,
    provider_refused: bool,
) -> None:
    """Every attempt teaches the router: failed attempts count against their deployment."""
    outcomes: list[Outcome] = []
    for attempt in ctx.attempts[:-1] if candidate is not None else ctx.attempts:
        if attempt.deployment is None:
            continue
        outcomes.append(
            Outcome(
                request_id=f"{ctx.request_id}#{len(outcomes)}",
                deployment_id=attempt.deployment,
                model=attempt.model,
                success=False,
                refused=attempt.cls is FailureClass.CONTENT_POLICY,
                final=False,
            )
        )
    if candidate is not None:
        outcomes.append(
            Outcome(
                request_id=ctx.request_id,
                deployment_id=candidate.deployment_id,
                model=ctx.model.name,
                success=200 <= event.status < 300 and not provider_refused,
                refused=provider_refused,
                cost_usd=event.cost_usd,
                latency_s=event.upstream_latency_ms / 1000,
                owner=ctx.principal.key_id or "",
            )
        )
    for outcome in outcomes:
        try:
            gateway.feedback.record_outcome_nowait(outcome)
        except trio.WouldBlock:
            log.warning("feedback store full; outcome dropped from routing statistics")
