"""``/v1/chat/completions`` and ``/v1/embeddings``: the pipeline, top to bottom.

auth → parse/validate → admission → guardrails → budget pre-flight → routing → policy →
dispatch (retries, fallbacks) → response → one usage event.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
import trio

from sbactor.errors import GatewayError
from sbactor.gateway import Gateway
from sbactor.ids import new_id
from sbactor.pipeline.context import (
    Incoming,
    Reply,
    RequestContext,
    parse_body,
    require_model,
    validate_chat,
    validate_embeddings,
)
from sbactor.pipeline.dispatch import OpenStream, Served, dispatch, open_stream
from sbactor.pipeline.events import cost_of, finish, usage_numbers
from sbactor.pipeline.stages import Refused, run_budget, run_guardrails, run_policy
from sbactor.pipeline.stream import abandon_stream, stream_response
from sbactor.providers.base import Provider, UpstreamResponse
from sbactor.resilience.compress import estimate_tokens


def _begin(gateway: Gateway, incoming: Incoming, surface: str) -> RequestContext:
    principal = gateway.authenticate(incoming.headers)
    body = parse_body(incoming.body)
    model = require_model(body, gateway.models, surface)
    if surface == "chat":
        validate_chat(body)
    else:
        validate_embeddings(body)
    error = gateway.admission()
    if error is not None:
        raise error
    stream = bool(body.get("stream")) if surface == "chat" else False
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    return RequestContext(
        request_id=incoming.request_id,
        started=incoming.started,
        principal=principal,
        surface=surface,
        body=body,
        requested_model=model.name,
        model=model,
        stream=stream,
        include_usage=include_usage,
    )


async def _govern(gateway: Gateway, ctx: RequestContext) -> Any:
    """The stages before dispatch; returns the first candidate to try."""
    guardrails = await run_guardrails(gateway, ctx)
    budget = await run_budget(gateway, ctx)
    candidate = gateway.route(ctx.model.name)
    chosen = await run_policy(gateway, ctx, candidate, guardrails, budget)
    if chosen is None:  # policy re-routed: the budget's hard limit applies to the new model too
        if ctx.reserved and gateway.budgets is not None:
            ctx.reserved = False
            await gateway.budgets.reconcile(ctx.uid, 0.0, 0)
            # a settled id is remembered (reconcile is idempotent): the new reservation needs
            # its own, or the request's final reconcile would be dropped as a duplicate
            ctx.uid = new_id()
        await run_budget(gateway, ctx)
        chosen = gateway.route(ctx.model.name)
    return chosen


def served_headers(
    ctx: RequestContext, served_model: str, provider: str, cost: float
) -> dict[str, str]:
    return {
        **ctx.headers,
        "x-sbactor-provider": provider,
        "x-sbactor-model": served_model,
        "x-sbactor-attempts": str(max(1, len(ctx.attempts))),
        "x-sbactor-cost-usd": f"{cost:.8f}",
        "x-sbactor-overhead-ms": f"{ctx.overhead_ms():.3f}",
    }


async def _refuse(gateway: Gateway, ctx: RequestContext, refused: Refused) -> GatewayError:
    await finish(
        gateway,
        ctx,
        kind="refusal",
        status=refused.error.status,
        refusal={"stage": refused.stage, "reason": refused.error.message, **refused.detail},
    )
    return refused.error


async def handle_chat(gateway: Gateway, incoming: Incoming) -> Reply:
    return await _handle(gateway, incoming, "chat")


async def handle_embeddings(gateway: Gateway, incoming: Incoming) -> Reply:
    return await _handle(gateway, incoming, "embeddings")


async def _handle(gateway: Gateway, incoming: Incoming, surface: str) -> Reply:
    """One request, start to reply. A stream stays in flight until its last byte (or until it
    is abandoned), so ``in_flight`` then belongs to the stream's own cleanup."""
    ctx = _begin(gateway, incoming, surface)
    gateway.in_flight += 1
    handed_off = False
    try:
        try:
            first = await _govern(gateway, ctx)
        except Refused as refused:
            raise await _refuse(gateway, ctx, refused) from None
        if not ctx.stream:
            call = _chat_call if surface == "chat" else _embeddings_call
            return await _respond_json(gateway, ctx, first, call)
        try:
            opened = await open_stream(gateway, ctx, first)
        except GatewayError as err:
            await _finish_error(gateway, ctx, err)
            raise
        handed_off = True
        return _stream_reply(gateway, ctx, opened)
    except BaseException as exc:
        if not ctx.finalized:
            await _finish_abandoned(gateway, ctx, exc)
        raise
    finally:
        if not handed_off:
            gateway.in_flight -= 1


def _stream_reply(gateway: Gateway, ctx: RequestContext, opened: OpenStream) -> Reply:
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            gateway.in_flight -= 1

    async def abandon() -> None:
        try:
            await abandon_stream(gateway, ctx, opened)
        finally:
            release()

    headers = served_headers(ctx, ctx.model.name, opened.candidate.provider, 0.0)
    del headers["x-sbactor-cost-usd"]  # not known yet: sent as an SSE comment at the end
    headers["content-type"] = "text/event-stream"
    headers["cache-control"] = "no-cache"
    stream = stream_response(gateway, ctx, opened, on_end=release)
    return Reply(200, headers, stream=stream, abandon=abandon)


async def _finish_error(gateway: Gateway, ctx: RequestContext, err: GatewayError) -> None:
    """The upstream side failed for good: the event records why (and the attempts)."""
    await finish(
        gateway,
        ctx,
        kind="error",
        status=err.status,
        error={"message": err.message, "code": err.code},
    )


async def _finish_abandoned(gateway: Gateway, ctx: RequestContext, exc: BaseException) -> None:
    """A request that ended without an event (disconnect or a bug) is still recorded."""
    disconnected = isinstance(exc, trio.Cancelled)
    status = 499 if disconnected else getattr(exc, "status", 500)
    message = "client disconnected before an answer was sent" if disconnected else repr(exc)
    with trio.CancelScope(shield=True):
        await finish(
            gateway,
            ctx,
            kind="error",
            status=status,
            client_disconnected=disconnected,
            error={"message": message},
        )


async def _chat_call(provider: Provider, body: dict[str, Any]) -> UpstreamResponse:
    body.pop("stream", None)
    body.pop("stream_options", None)
    return await provider.chat(body)


async def _embeddings_call(provider: Provider, body: dict[str, Any]) -> UpstreamResponse:
    return await provider.embeddings(body)


async def _respond_json(gateway: Gateway, ctx: RequestContext, first: Any, call: Any) -> Reply:
    try:
        served: Served = await dispatch(gateway, ctx, call, first)
    except GatewayError as err:
        await _finish_error(gateway, ctx, err)
        raise
    upstream = served.response
    payload = dict(upstream.json or {})
    numbers = usage_numbers(payload.get("usage"))
    estimated = numbers is None
    if numbers is None:
        numbers = _estimate_usage(ctx, payload)
    prompt_tokens, completion_tokens = numbers
    finish_reason = _finish_reason(payload)
    cost = cost_of(served.candidate, prompt_tokens, completion_tokens)
    headers = served_headers(ctx, ctx.model.name, served.candidate.provider, cost)
    await finish(
        gateway,
        ctx,
        kind="completion",
        status=upstream.status,
        candidate=served.candidate,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        usage_estimated=estimated,
        finish_reason=finish_reason,
        provider_refused=served.refused,
    )
    if "model" in payload:
        payload["model"] = ctx.model.name
    headers["x-sbactor-overhead-ms"] = f"{ctx.overhead_ms():.3f}"
    headers["content-type"] = "application/json"
    return Reply(upstream.status, headers, body=orjson.dumps(payload))


def _finish_reason(payload: dict[str, Any]) -> str | None:
    choices = payload.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        reason = choices[0].get("finish_reason")
        return reason if isinstance(reason, str) else None
    return None


def _estimate_usage(ctx: RequestContext, payload: dict[str, Any]) -> tuple[int, int]:
    if ctx.surface == "chat":
        prompt = estimate_tokens(ctx.body["messages"])
        text = ""
        for choice in payload.get("choices") or []:
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                text += message["content"]
        return prompt, math.ceil(len(text) / 4)
    data = ctx.body.get("input")
    texts = [data] if isinstance(data, str) else [str(x) for x in data or []]
    return math.ceil(sum(len(t) for t in texts) / 4), 0
