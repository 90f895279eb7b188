"""The failover loop: the resilience planner decides, this shell routes, calls and records.

Each attempt is classified (``resilience.failure``), fed to the planner (retry, typed fallback,
compression, give up), to the cooldown tracker, and kept for the usage event. Streams may fail
over only until their first content is in hand (``resilience.StreamGuard`` holds back the empty
opening chunks): ``open_stream`` returns with it, after which the response has started and a
failure can only end the stream.
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
    classify_exception,
    classify_response,
)
from sbactor.resilience.planner import AttemptPlanner, Done, GiveUp, Try
from sbactor.resilience.report import give_up_error
from sbactor.resilience.stream import StreamGuard
from sbactor.routing.strategies import Candidate

Call = Callable[[Provider, dict[str, Any]], Awaitable[UpstreamResponse]]


@attrs.frozen
class Served:
    response: UpstreamResponse
    candidate: Candidate
    refused: bool  # the provider refused (served as is: no content-policy fallback left)


@attrs.define(eq=False)
class OpenStream:
    """An upstream stream that has produced its first content: ``first`` goes to the client,
    then the rest of ``batches`` (chunks grouped by what arrived together)."""

    stack: contextlib.AsyncExitStack
    batches: AsyncIterator[list[dict[str, Any]]]
    first: list[dict[str, Any]]
    candidate: Candidate
    ended: bool = False  # the upstream already finished while we read ``first``
    failure: Failure | None = None  # it already failed, after ``first`` (end with an error)


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
    gateway.feedback.note_choice(step.model, candidate.deployment_id)  # traffic it really got
    planner.record(candidate.deployment_id, step.model, failure, now, provider=candidate.provider)
    if failure is None:
        gateway.cooldowns.record_success(candidate.deployment_id, now)
        outcome = "ok"
    else:
        gateway.cooldowns.record_failure(
            candidate.deployment_id, failure.cls, now, failure.retry_after_s
        )
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
            ctx.tags.extend(t for t in planner.tags if t not in ctx.tags)
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


@attrs.define(eq=False)
class _StreamAttempt:
    """One upstream stream read up to its first byte of answer (or its failure)."""

    stack: contextlib.AsyncExitStack
    batches: AsyncIterator[list[dict[str, Any]]] | None = None
    seen: list[dict[str, Any]] = attrs.field(factory=list)  # everything read so far
    released: list[dict[str, Any]] = attrs.field(factory=list)  # what the client may get
    ended: bool = False
    failure: Failure | None = None  # before the first content: fail over
    late_failure: Failure | None = None  # after it, in the same read: end the stream

    def opened(self, candidate: Candidate, chunks: list[dict[str, Any]]) -> OpenStream:
        assert self.batches is not None
        return OpenStream(
            self.stack, self.batches, chunks, candidate, self.ended, self.late_failure
        )


async def _attempt_stream(
    provider: Provider, body: dict[str, Any], timeout_s: float, idle_s: float
) -> _StreamAttempt:
    """Open the stream and read until the guard commits: role-only chunks are held back, so a
    cut, error or content filter before any content can still fail over."""
    attempt = _StreamAttempt(contextlib.AsyncExitStack())
    guard = StreamGuard()
    try:
        with trio.fail_after(timeout_s):
            with trio.fail_after(idle_s):
                stream: UpstreamStream = await attempt.stack.enter_async_context(
                    provider.open_chat_stream(body)
                )
            if stream.error is not None:
                err = stream.error
                payload = err.json if err.json is not None else err.body
                attempt.failure = classify_response(err.status, err.headers, payload) or Failure(
                    FailureClass.UNKNOWN, err.status, "stream failed"
                )
                return attempt
            attempt.batches = stream.chunk_batches()
            while not guard.committed:
                with trio.fail_after(idle_s):
                    batch = await next_batch(attempt.batches)
                if batch is None:
                    attempt.ended = True
                    attempt.released = [dict(c) for c in guard.finish()]
                    if not attempt.released:
                        attempt.failure = Failure(
                            FailureClass.SERVER_ERROR, None, "upstream stream was empty"
                        )
                    break
                for chunk in batch:
                    attempt.seen.append(chunk)
                    released, failure = guard.feed(chunk)
                    attempt.released.extend(dict(c) for c in released)
                    if failure is not None:
                        if attempt.released:
                            attempt.late_failure = failure
                        else:
                            attempt.failure = failure
                        break
                if attempt.failure is not None or attempt.late_failure is not None:
                    break
    except trio.TooSlowError:
        attempt.failure = Failure(
            FailureClass.TIMEOUT, None, f"no answer from the stream within {idle_s:.1f}s"
        )
    except UpstreamError as exc:
        attempt.failure = classify_exception(exc)
    except BaseException:
        await _close(attempt.stack)  # cancelled (client gone) or a bug: free the connection now
        raise
    return attempt


async def next_batch(
    batches: AsyncIterator[list[dict[str, Any]]],
) -> list[dict[str, Any]] | None:
    try:
        return await anext(batches)
    except StopAsyncIteration:
        return None


async def open_stream(gateway: Gateway, ctx: RequestContext, first: Candidate | None) -> OpenStream:
    """Open an upstream stream up to its first content, failing over until that succeeds."""
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
        t0 = time.perf_counter()
        attempt = await _attempt_stream(
            gateway.providers[candidate.provider], body, step.timeout_s, idle
        )
        ctx.upstream_s += time.perf_counter() - t0
        failure = attempt.failure
        if (
            failure is not None
            and failure.cls is FailureClass.CONTENT_POLICY
            and attempt.batches is not None
            and failure.status is None
        ):
            # an in-band refusal of a 200 stream: usable as is (like the JSON path) when no
            # content-policy fallback is left, instead of a 400
            failure = attrs.evolve(failure, status=200)
        _record(gateway, ctx, planner, step, candidate, failure)
        if failure is None:
            _switch_model(gateway, ctx, step.model)
            if step.messages is not None:
                ctx.body = {**ctx.body, "messages": [dict(m) for m in step.messages]}
            ctx.tags.extend(t for t in planner.tags if t not in ctx.tags)
            return attempt.opened(candidate, attempt.released)
        if failure.cls is FailureClass.CONTENT_POLICY and attempt.batches is not None:
            # the provider's own refusal: served as is if no content-policy fallback is left
            _switch_model(gateway, ctx, step.model)
            refusal = (len(planner.attempts) - 1, attempt.opened(candidate, attempt.seen))
            continue
        await _close(attempt.stack)


async def _close(stack: contextlib.AsyncExitStack) -> None:
    with trio.CancelScope(shield=True):
        await stack.aclose()


def _switch_model(gateway: Gateway, ctx: RequestContext, model: str) -> None:
    if model != ctx.model.name:
        ctx.model = gateway.models[model]
