"""Anthropic Messages API behind the OpenAI chat-completions interface (translation in
``anthropic_translate``; this module only does I/O)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson

from sbactor.providers._http import HttpShell, resolve_api_key
from sbactor.providers._wire import WireResponse
from sbactor.providers.anthropic_translate import (
    AnthropicStreamError,
    StreamTranslator,
    to_anthropic_request,
    to_openai_error,
    to_openai_response,
)
from sbactor.providers.base import (
    ProviderStatistics,
    UpstreamResponse,
    UpstreamStream,
    UpstreamStreamBroken,
    make_response,
)
from sbactor.providers.config import AnthropicProviderConfig


def _translated(resp: UpstreamResponse) -> UpstreamResponse:
    """Turn an Anthropic answer (success or error) into OpenAI shape, keeping status/headers."""
    headers = {k: v for k, v in resp.headers.items() if k not in ("content-length",
                                                                   "content-encoding")}
    if 200 <= resp.status < 300 and resp.json is not None:
        body = to_openai_response(resp.json, int(time.time()))
    elif 200 <= resp.status < 300:
        return resp
    else:
        body = to_openai_error(resp.status, resp.json, resp.body)
    return make_response(resp.status, headers, body, resp.latency_s)


class AnthropicStream(UpstreamStream):
    def __init__(self, shell: HttpShell, resp: WireResponse, error: UpstreamResponse | None,
                 include_usage: bool) -> None:
        super().__init__(resp.status, dict(resp.headers.items()),
                         _translated(error) if error is not None else None)
        self._shell = shell
        self._resp = resp
        self._translator = StreamTranslator(include_usage=include_usage,
                                            created=int(time.time()))

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        if self.error is not None:
            return
        who = f"provider {self._shell.name!r} ({self._shell.host})"
        async for event in self._shell.iter_sse(self._resp):
            if not event.data.strip():
                continue
            try:
                data = orjson.loads(event.data)
                out = self._translator.feed(data)
            except orjson.JSONDecodeError:
                raise UpstreamStreamBroken(
                    f"{who}: invalid JSON in stream: {event.data[:120]!r}") from None
            except AnthropicStreamError as exc:
                raise UpstreamStreamBroken(f"{who}: upstream error mid-stream: {exc}") from exc
            for chunk in out:
                yield chunk
            if self._translator.done:
                try:
                    await self._resp.drain()  # lets the connection be reused
                except Exception:
                    pass
                return
        raise UpstreamStreamBroken(f"{who}: stream ended before message_stop")


class AnthropicProvider:
    """``x-api-key`` + ``anthropic-version`` headers, one shared pooled client."""

    def __init__(self, cfg: AnthropicProviderConfig) -> None:
        self.name = cfg.name
        self.config = cfg
        headers = {"anthropic-version": cfg.anthropic_version, **cfg.headers}
        key = resolve_api_key(cfg.api_key, cfg.api_key_env)
        if key:
            headers["x-api-key"] = key
        self._shell = HttpShell(name=cfg.name, kind="anthropic", base_url=cfg.base_url,
                                headers=headers, timeout_s=cfg.timeout_s,
                                connect_timeout_s=cfg.connect_timeout_s,
                                max_connections=cfg.max_connections)

    async def chat(self, body: dict[str, Any]) -> UpstreamResponse:
        payload = to_anthropic_request({**body, "stream": False}, self.config.default_max_tokens)
        return _translated(await self._shell.post_json("/v1/messages", payload))

    @asynccontextmanager
    async def open_chat_stream(self, body: dict[str, Any]) -> AsyncIterator[UpstreamStream]:
        payload = to_anthropic_request({**body, "stream": True}, self.config.default_max_tokens)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        async with self._shell.open_stream("/v1/messages", payload) as (resp, error):
            yield AnthropicStream(self._shell, resp, error, include_usage)

    async def embeddings(self, body: dict[str, Any]) -> UpstreamResponse:
        message = f"provider {self.name!r} (anthropic) does not support embeddings"
        return make_response(400, {}, {"error": {"message": message,
                                                 "type": "invalid_request_error",
                                                 "param": "model", "code": "unsupported"}}, 0.0)

    async def aclose(self) -> None:
        await self._shell.aclose()

    def statistics(self) -> ProviderStatistics:
        return self._shell.statistics()
