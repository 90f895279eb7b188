"""Relaying an upstream stream as SSE, counting usage and ending cleanly whatever happens.

Once the first chunk is sent, a failure can only end the stream: an OpenAI-style error chunk,
then the end of the response without ``[DONE]`` — never a hang, never a silent ``[DONE]``.
A client that disconnects cancels this generator; the upstream request is closed and the usage
event still records what was streamed.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import trio

from sbactor.errors import GatewayError
from sbactor.gateway import Gateway
from sbactor.pipeline.context import RequestContext
from sbactor.pipeline.dispatch import OpenStream, next_batch
from sbactor.pipeline.events import finish, usage_numbers
from sbactor.providers.base import UpstreamError
from sbactor.resilience.compress import estimate_tokens
from sbactor.resilience.failure import Failure, FailureClass, classify_exception
from sbactor.resilience.report import stream_error_sse
from sbactor.usage.event import UsageEvent

DONE = b"data: [DONE]\n\n"


def sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


class _Tally:
    """What the stream carried, for the usage event."""

    def __init__(self) -> None:
        self.chars = 0
        self.usage: tuple[int, int] | None = None
        self.finish_reason: str | None = None
        self.id = ""
        self.created = int(time.time())

    def see(self, chunk: dict[str, Any]) -> None:
        self.id = chunk.get("id") or self.id
        numbers = usage_numbers(chunk.get("usage"))
        if numbers is not None:
            self.usage = numbers
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                self.chars += len(content)
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self.finish_reason = reason


def _relay(ctx: RequestContext, tally: _Tally, chunks: list[dict[str, Any]]) -> bytes:
    out = []
    for chunk in chunks:
        tally.see(chunk)
        shown = _for_client(ctx, chunk)
        if shown is not None:
            out.append(sse(shown))
    return b"".join(out)


def _for_client(ctx: RequestContext, chunk: dict[str, Any]) -> dict[str, Any] | None:
    """The chunk as the client should see it: our model name; usage only if it asked."""
    out = dict(chunk)
    if "model" in out:
        out["model"] = ctx.model.name
    if not ctx.include_usage and "usage" in out:
        if not out.get("choices"):
            return None  # the usage-only chunk we asked the upstream for
        out.pop("usage")
    return out


async def stream_response(
    gateway: Gateway,
    ctx: RequestContext,
    opened: OpenStream,
    *,
    on_end: Callable[[], None] | None = None,
) -> AsyncIterator[bytes]:
    tally = _Tally()
    idle = gateway.config.resilience.stream_idle_timeout_s
    failure: Failure | None = None
    completed = False
    upstream_t0 = time.perf_counter()
    try:
        first = _relay(ctx, tally, opened.first)
        if first:
            yield first
        failure = opened.failure
        completed = opened.ended
        while not completed and failure is None:
            try:
                with trio.fail_after(idle):
                    batch = await next_batch(opened.batches)
            except trio.TooSlowError:
                failure = Failure(FailureClass.TIMEOUT, None, f"no chunk for {idle:.0f}s")
                break
            except UpstreamError as exc:
                failure = classify_exception(exc)
                break
            if batch is None:
                completed = True
                break
            data = _relay(ctx, tally, batch)
            if data:
                yield data  # one write for everything that arrived together
        ctx.upstream_s += time.perf_counter() - upstream_t0
        await _close(opened)
        try:
            event = await _finish_stream(gateway, ctx, opened, tally, failure=failure)
        except GatewayError as err:  # strict durability: the entry could not be made durable
            yield _error_sse(err.message, err.type, err.code, tally, ctx)
            return
        if failure is not None:
            yield stream_error_sse(
                failure,
                model=ctx.model.name,
                completion_id=tally.id or ctx.request_id,
                created=tally.created,
            )
        else:
            cost = event.cost_usd if event is not None else 0.0
            yield f": x-sbactor-cost-usd={cost:.8f}\n\n".encode() + DONE
    finally:
        try:
            if not ctx.finalized:  # client went away (or we were cancelled) mid-stream
                with trio.CancelScope(shield=True):
                    ctx.upstream_s += time.perf_counter() - upstream_t0
                    await _close(opened)
                    await _finish_stream(
                        gateway, ctx, opened, tally, failure=failure, disconnected=not completed
                    )
        finally:
            if on_end is not None:
                on_end()


async def abandon_stream(gateway: Gateway, ctx: RequestContext, opened: OpenStream) -> None:
    """The stream was never started (the client left first): close the upstream and record."""
    with trio.CancelScope(shield=True):
        await _close(opened)
        if not ctx.finalized:
            await _finish_stream(gateway, ctx, opened, _Tally(), failure=None, disconnected=True)


def _error_sse(
    message: str, type_: str, code: str | None, tally: _Tally, ctx: RequestContext
) -> bytes:
    chunk = {
        "id": tally.id or ctx.request_id,
        "object": "chat.completion.chunk",
        "created": tally.created,
        "model": ctx.model.name,
        "choices": [],
        "error": {"message": message, "type": type_, "code": code, "param": None},
    }
    return sse(chunk)


async def _close(opened: OpenStream) -> None:
    with trio.CancelScope(shield=True):
        await opened.stack.aclose()


async def _finish_stream(
    gateway: Gateway,
    ctx: RequestContext,
    opened: OpenStream,
    tally: _Tally,
    *,
    failure: Failure | None,
    disconnected: bool = False,
) -> UsageEvent | None:
    if ctx.finalized:
        return None
    estimated = tally.usage is None
    if tally.usage is not None:
        prompt, completion = tally.usage
    else:
        prompt = estimate_tokens(ctx.body.get("messages") or [])
        completion = math.ceil(tally.chars / 4)
    error = None
    if failure is not None:
        error = {"message": failure.message, "class": failure.cls.value, "mid_stream": True}
    return await finish(
        gateway,
        ctx,
        kind="completion" if failure is None and not disconnected else "error",
        status=200 if failure is None and not disconnected else (499 if disconnected else 502),
        candidate=opened.candidate,
        prompt_tokens=prompt,
        completion_tokens=completion,
        usage_estimated=estimated,
        finish_reason=tally.finish_reason,
        error=error,
        provider_refused=ctx.provider_refused or tally.finish_reason == "content_filter",
        client_disconnected=disconnected,
    )
