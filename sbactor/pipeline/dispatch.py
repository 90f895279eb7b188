"""The failover loop: the resilience planner decides, this shell routes, calls and records.

Each attempt is classified (``resilience.failure``), fed to the planner (retry, typed fallback,
compression, give up), to the cooldown tracker, and kept for the usage event. Streams may fail
over only until their first chunk is in hand: ``open_stream`` returns with that chunk, after
which the response has started and a failure can only end the stream.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import trio

from sbactor.errors import GatewayError
from sbactor.gateway import Gateway
from sbactor.pipeline.context import RequestContext
from sbactor.providers.base import Provider, UpstreamError, UpstreamResponse, UpstreamStream
from sbactor.resilience.failure import (
    Failure,
    FailureClass,
    classify_chunk,
    classify_exception,
    classify_response,
)
from sbactor.resilience.planner import AttemptPlanner, Done, GiveUp, Try
from sbactor.resilience.report import give_up_error
from sbactor.routing.strategies import Candidate

Call = Callable[[Provider, dict[str, Any]], Awaitable[UpstreamResponse]]


@attrs.frozen
class Served:
    response: UpstreamResponse
    candidate: Candidate
    refused: bool  # the provider refused (served as is: no content-policy fallback left)


@attrs.define(eq=False)
class OpenStream:
    stack: contextlib.AsyncExitStack
    chunks: AsyncIterator[dict[str, Any]]
    first: dict[str, Any]
    candidate: Candidate


def make_planner(gateway: Gateway, ctx: RequestContext) -> AttemptPlanner:
    messages = ctx.body.get("messages") if ctx.surface == "chat" else None
    max_tokens = ctx.body.get("max_tokens") or ctx.body.get("max_completion_tokens") or 0
    return AttemptPlanner(
        config=gateway.config.resilience,
        model=ctx.model.name,
        fallbacks=gateway.fallbacks,
        rng=gateway.rng,
        started_at=trio.current_time(),
        messages=messages if isinstance(messages, list) else None,
        reserve_output_tokens=int(max_tokens) if isinstance(max_tokens, int) else 0,
    )


async def _wait(ctx: RequestContext, step: Try) -> None:
    if step.delay_s > 0:
        t0 = time.perf_counter()
        await trio.sleep(step.delay_s)
        ctx.upstream_s += time.perf_counter() - t0


def _route(gateway: Gateway, step: Try, first: Candidate | None) -> Candidate | None:
    if (
        first is not None
        and step.reason == "first"
        and first.provider not in step.exclude_providers
    ):
        return first
    return gateway.route(
        step.model,
        exclude=step.exclude_deployments,
        exclude_providers=step.exclude_providers,
        prefer=step.prefer_deployment,
    )


def _request_body(ctx: RequestContext, step: Try, candidate: Candidate) -> dict[str, Any]:
    body = dict(ctx.body)
    body["model"] = candidate.model
    if step.messages is not None:
        body["messages"] = [dict(m) for m in step.messages]
    return body


def _record(
    gateway: Gateway,
    ctx: RequestContext,
    planner: AttemptPlanner,
    step: Try,
    candidate: Candidate,
    failure: Failure | None,
) -> None:
    now = trio.current_time()
    planner.record(candidate.deployment_id, step.model, failure, now, provider=candidate.provider)
    if failure is None:
        gateway.cooldowns.record_success(candidate.deployment_id, now)
        outcome = "ok"
    else:
        gateway.cooldowns.record_failure(candidate.deployment_id, failure.cls, now)
        outcome = failure.cls.value
    gateway.metrics.upstream_attempts.labels(candidate.provider, outcome).inc()
    ctx.attempts = list(planner.attempts)


def _give_up(ctx: RequestContext, planner: AttemptPlanner, step: GiveUp) -> GatewayError:
    error = give_up_error(step, planner.attempts)
    headers = {"x-sbactor-attempts": str(len(planner.attempts))}
    if error.retry_after_s is not None:
        headers["retry-after"] = str(max(1, round(error.retry_after_s)))
    return GatewayError(error.status, error.message, error.type, error.code, headers=headers)


async def dispatch(
    gateway: Gateway, ctx: RequestContext, call: Call, first: Candidate | None
) -> Served:
    """Run attempts until one is served; raise ``GatewayError`` when the planner gives up."""
    planner = make_planner(gateway, ctx)
    served: list[tuple[UpstreamResponse | None, Candidate | None]] = []
    while True:
        step = planner.next_step(trio.current_time())
        if isinstance(step, Done):
            done_response, done_candidate = served[-1]
            assert done_response is not None and done_candidate is not None
            _switch_model(gateway, ctx, step.attempt.model)
            return Served(done_response, done_candidate, refused=False)
        if isinstance(step, GiveUp):
            ctx.tags.extend(t for t in planner.tags if t not in ctx.tags)
            if step.usable_attempt is not None:
                kept_response, kept_candidate = served[step.usable_attempt]
                if kept_response is not None and kept_candidate is not None:
                    _switch_model(gateway, ctx, planner.attempts[step.usable_attempt].model)
                    return Served(kept_response, kept_candidate, refused=True)
            raise _give_up(ctx, planner, step)
        await _wait(ctx, step)
        candidate = _route(gateway, step, first)
        if candidate is None:
            planner.record_unroutable(step.model, trio.current_time())
            served.append((None, None))
            continue
        body = _request_body(ctx, step, candidate)
        provider = gateway.providers[candidate.provider]
        t0 = time.perf_counter()
        response: UpstreamResponse | None = None
        try:
            with trio.fail_after(step.timeout_s):
                response = await call(provider, body)
        except trio.TooSlowError:
            failure: Failure | None = Failure(
                FailureClass.TIMEOUT, None, f"no answer within {step.timeout_s:.1f}s"
            )
        except UpstreamError as exc:
            failure = classify_exception(exc)
        else:
            payload = response.json if response.json is not None else response.body
            failure = classify_response(response.status, response.headers, payload)
        ctx.upstream_s += time.perf_counter() - t0
        served.append((response, candidate))
        _record(gateway, ctx, planner, step, candidate, failure)
        if step.messages is not None:
            ctx.body = {**ctx.body, "messages": [dict(m) for m in step.messages]}


async def open_stream(gateway: Gateway, ctx: RequestContext, first: Candidate | None) -> OpenStream:
    """Open an upstream stream and read its first chunk, failing over until that succeeds."""
    planner = make_planner(gateway, ctx)
    idle = gateway.config.resilience.stream_idle_timeout_s
    refusal: tuple[int, OpenStream] | None = None  # a 2xx content-filtered stream, kept open
    while True:
        step = planner.next_step(trio.current_time())
        if isinstance(step, GiveUp):
            ctx.tags.extend(t for t in planner.tags if t not in ctx.tags)
            if refusal is not None and step.usable_attempt == refusal[0]:
                ctx.provider_refused = True
                return refusal[1]
            if refusal is not None:
                await _close(refusal[1].stack)
            raise _give_up(ctx, planner, step)
        if isinstance(step, Done):  # pragma: no cover - we return on success below
            raise RuntimeError("stream planner finished without an open stream")
        if refusal is not None:
            await _close(refusal[1].stack)
            refusal = None
        await _wait(ctx, step)
        candidate = _route(gateway, step, first)
        if candidate is None:
            planner.record_unroutable(step.model, trio.current_time())
            continue
        body = _request_body(ctx, step, candidate)
        body["stream"] = True
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        provider = gateway.providers[candidate.provider]
        stack = contextlib.AsyncExitStack()
        t0 = time.perf_counter()
        failure: Failure | None = None
        chunks: AsyncIterator[dict[str, Any]] | None = None
        first_chunk: dict[str, Any] | None = None
        try:
            with trio.fail_after(min(step.timeout_s, idle)):
                stream: UpstreamStream = await stack.enter_async_context(
                    provider.open_chat_stream(body)
                )
                if stream.error is not None:
                    err = stream.error
                    payload = err.json if err.json is not None else err.body
                    failure = classify_response(err.status, err.headers, payload)
                    if failure is None:
                        failure = Failure(FailureClass.UNKNOWN, err.status, "stream failed")
                else:
                    chunks = stream.chunks()
                    first_chunk = await anext(chunks, None)
                    if first_chunk is None:
                        failure = Failure(
                            FailureClass.SERVER_ERROR, None, "upstream stream was empty"
                        )
                    else:
                        failure = classify_chunk(first_chunk)
        except trio.TooSlowError:
            failure = Failure(FailureClass.TIMEOUT, None, f"no first chunk within {idle:.1f}s")
        except UpstreamError as exc:
            failure = classify_exception(exc)
        ctx.upstream_s += time.perf_counter() - t0
        _record(gateway, ctx, planner, step, candidate, failure)
        if failure is None and chunks is not None and first_chunk is not None:
            _switch_model(gateway, ctx, step.model)
            if step.messages is not None:
                ctx.body = {**ctx.body, "messages": [dict(m) for m in step.messages]}
            ctx.tags.extend(t for t in planner.tags if t not in ctx.tags)
            return OpenStream(stack, chunks, first_chunk, candidate)
        if (
            failure is not None
            and failure.cls is FailureClass.CONTENT_POLICY
            and chunks is not None
            and first_chunk is not None
        ):
            _switch_model(gateway, ctx, step.model)
            refusal = (len(planner.attempts) - 1, OpenStream(stack, chunks, first_chunk, candidate))
            continue
        await _close(stack)


async def _close(stack: contextlib.AsyncExitStack) -> None:
    with trio.CancelScope(shield=True):
        await stack.aclose()


def _switch_model(gateway: Gateway, ctx: RequestContext, model: str) -> None:
    if model != ctx.model.name:
        ctx.model = gateway.models[model]
