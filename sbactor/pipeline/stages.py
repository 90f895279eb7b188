"""The governance stages before dispatch: guardrails, budget pre-flight, policy.

Each stage either lets the request go on (possibly changed: redacted, downgraded, re-routed)
or refuses it with a ``Refused`` that the handler turns into an HTTP error *and* a usage event,
so the ledger proves what was refused as well as what was served.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs

from sbactor.actors.budget_tracker import PreflightRequest
from sbactor.actors.runtime import ActorCallTimeout, ActorClosed, ActorError
from sbactor.budget.estimate import estimate_tokens
from sbactor.budget.scopes import RequestScopes
from sbactor.errors import GatewayError
from sbactor.gateway import Gateway, worst_case_usd
from sbactor.guardrails.mesh import evaluate
from sbactor.guardrails.redaction import message_texts, redact_messages
from sbactor.pipeline.context import RequestContext
from sbactor.policy.activation import build_activation, neutral_activation
from sbactor.routing.strategies import Candidate

log = logging.getLogger("sbactor.policy")
audit_log = logging.getLogger("sbactor.audit")

_GUARDRAIL_KEYS = tuple(neutral_activation()["ai"]["guardrails"])
_BUDGET_KEYS = tuple(neutral_activation()["ai"]["budget"])


@attrs.frozen
class Refused(Exception):
    """The gateway itself refused the request at ``stage``."""

    stage: str
    error: GatewayError
    detail: dict[str, Any]


async def run_guardrails(gateway: Gateway, ctx: RequestContext) -> dict[str, Any] | None:
    """The mesh verdict; blocks, or redacts the messages before any upstream sees them."""
    guardrails = gateway.guardrails
    if guardrails is None or ctx.surface != "chat":
        return None
    messages = ctx.body["messages"]
    result = await evaluate(
        message_texts(messages), guardrails, cache=gateway.verdict_cache, http=gateway.http
    )
    ctx.guardrails = result.as_event()
    if result.action == "block":
        labels = ",".join(result.labels) or "guardrail"
        raise Refused(
            "guardrails",
            GatewayError(
                400,
                f"request blocked by guardrails: {result.flagged_count} detector(s) flagged it "
                f"({', '.join(result.labels)})",
                "guardrail_violation",
                labels,
            ),
            {"labels": list(result.labels), "flagged_count": result.flagged_count},
        )
    if result.action == "redact":
        ctx.body = {**ctx.body, "messages": redact_messages(messages, result, guardrails)}
        ctx.tags.append("redacted")
    activation = result.as_activation()
    return {k: activation[k] for k in _GUARDRAIL_KEYS if k in activation}


def _max_output(ctx: RequestContext) -> int:
    value = ctx.body.get("max_tokens") or ctx.body.get("max_completion_tokens")
    return int(value) if isinstance(value, int) else ctx.model.max_output_tokens


def _input_tokens(ctx: RequestContext) -> int:
    if ctx.surface == "chat":
        return estimate_tokens(ctx.body["messages"])
    data = ctx.body.get("input")
    texts = [data] if isinstance(data, str) else [str(x) for x in data or []]
    return sum(len(t) for t in texts) // 4 + 1


def worst_case_cost(gateway: Gateway, ctx: RequestContext) -> float:
    """Input estimate + the whole output allowance at the dearest deployment of the model."""
    cost = worst_case_usd(gateway.candidates[ctx.model.name], _input_tokens(ctx), _max_output(ctx))
    return cost or 0.0


async def _preflight(gateway: Gateway, tracker: Any, ctx: RequestContext) -> Any:
    principal = ctx.principal
    return await tracker.preflight(
        PreflightRequest(
            request_id=ctx.uid,
            scopes=RequestScopes(
                key_id=principal.key_id,
                user=principal.user,
                team=principal.team,
                model=ctx.model.name,
                tags=principal.tags,
            ),
            model=ctx.model.name,
            input_tokens=_input_tokens(ctx),
            max_output_tokens=_max_output(ctx),
            cost_estimate_usd=worst_case_cost(gateway, ctx),
        ),
        timeout_s=gateway.config.actors.call_timeout_s,
    )


async def run_budget(gateway: Gateway, ctx: RequestContext) -> dict[str, Any] | None:
    """Reserve the worst case in every scope; refuse, warn or downgrade as the tracker says."""
    tracker = gateway.budgets
    if tracker is None:
        return None
    ctx.reserved = True  # before the call: if it times out, the reconcile still releases
    try:
        result = await _preflight(gateway, tracker, ctx)
    except (ActorCallTimeout, ActorClosed, ActorError):
        raise Refused(
            "budget",
            GatewayError(
                503,
                "budget tracker unavailable; try again",
                "service_unavailable",
                "budget_unavailable",
                headers={"retry-after": "1"},
            ),
            {"kind": "unavailable"},
        ) from None
    ctx.budget = {
        "fraction": round(result.fraction, 6),
        "forecast_fraction": round(result.forecast_fraction, 6),
    }
    if result.degraded:
        ctx.tags.append("state_degraded")
    if not result.ok and result.kind == "unavailable":
        raise Refused(
            "budget",
            GatewayError(
                503,
                str(result.message),
                "service_unavailable",
                "state_unavailable",
                headers=result.headers(),
            ),
            {"kind": result.kind},
        )
    if not result.ok:
        body = result.error_body()["error"]
        raise Refused(
            "budget" if result.kind == "budget" else "rate_limit",
            GatewayError(
                429,
                str(body["message"]),
                str(body["type"]),
                str(body["code"]),
                headers=result.headers(),
                details={k: body[k] for k in ("scope", "resets_at", "retry_after_s") if k in body},
            ),
            {"scope": result.scope, "resets_at": result.resets_at, "kind": result.kind},
        )
    ctx.reserved = True
    ctx.headers.update(result.headers())
    if result.warn and result.warning:
        ctx.budget["warning"] = result.warning
        log.warning("budget warning", extra={"warning": result.warning})
    if result.downgrade:
        target = result.downgrade_to or cheapest_model(gateway, ctx)
        if target and target != ctx.model.name and target in gateway.models:
            ctx.budget["downgraded_from"] = ctx.model.name
            ctx.model = gateway.models[target]
            ctx.tags.append("budget_soft_landing")
    view = result.policy_view()
    return {k: view[k] for k in _BUDGET_KEYS if k in view}


def cheapest_model(gateway: Gateway, ctx: RequestContext) -> str | None:
    same_surface = [m for m in gateway.config.models if m.surface == ctx.surface]
    if not same_surface:
        return None

    def price(name: str) -> float:
        cands = gateway.candidates[name]
        return min((c.input_per_mtok + c.output_per_mtok for c in cands), default=0.0)

    return min(same_surface, key=lambda m: price(m.name)).name


def policy_activation(
    ctx: RequestContext,
    candidate: Candidate | None,
    guardrails: dict[str, Any] | None,
    budget: dict[str, Any] | None,
) -> dict[str, Any]:
    body = ctx.body
    return build_activation(
        surface=ctx.surface,
        model=ctx.requested_model,
        route={
            "model": ctx.model.name,
            "provider": candidate.provider if candidate else "",
        },
        principal={
            "key_id": ctx.principal.key_id or "",
            "user": ctx.principal.user or "",
            "team": ctx.principal.team or "",
            "tier": ctx.principal.tier,
            "tags": list(ctx.principal.tags),
        },
        guardrails=guardrails,
        budget=budget,
        tokens={"input_est": _input_tokens(ctx), "max_output": _max_output(ctx)},
        request={"stream": bool(body.get("stream")), "tools": bool(body.get("tools"))},
    )


async def run_policy(
    gateway: Gateway,
    ctx: RequestContext,
    candidate: Candidate | None,
    guardrails: dict[str, Any] | None,
    budget: dict[str, Any] | None,
) -> Candidate | None:
    """Apply the CEL decision; returns the candidate to start with (None: route again)."""
    policy = gateway.policy
    if policy is None:
        return candidate
    outcome = policy.evaluate(policy_activation(ctx, candidate, guardrails, budget))
    decision = outcome.decision
    ctx.policy = {"actions": list(decision.actions)}
    if outcome.applied_on_error:
        gateway.metrics.policy_errors.inc()
        ctx.policy["error"] = outcome.error
        log.warning("policy evaluation failed; applied on_error", extra={"error": outcome.error})
    if decision.audit:
        ctx.policy["audit"] = decision.audit
        audit_log.warning(
            "policy audit",
            extra={
                "audit": decision.audit,
                "principal": ctx.principal.as_dict(),
                "model": ctx.requested_model,
                "actions": list(decision.actions),
            },
        )
    if decision.sink_tag:
        ctx.sink_tag = decision.sink_tag
    if decision.block:
        raise Refused(
            "policy",
            GatewayError(403, "request blocked by policy", "policy_block", "policy_block"),
            {"actions": list(decision.actions)},
        )
    if decision.redact and ctx.surface == "chat":
        ctx.body = {
            **ctx.body,
            "messages": redact_messages(ctx.body["messages"], None, gateway.redactor),
        }
        if "redacted" not in ctx.tags:
            ctx.tags.append("redacted")
    if decision.route_to and decision.route_to != ctx.model.name:
        ctx.policy["routed_from"] = ctx.model.name
        ctx.model = gateway.models[decision.route_to]
        return None
    return candidate
