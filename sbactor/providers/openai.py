"""Any OpenAI-compatible upstream: bodies pass through untouched, SSE chunks parsed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson

from sbactor.providers._http import HttpShell, resolve_api_key
from sbactor.providers._wire import WireResponse
from sbactor.providers.base import (
    ProviderStatistics,
    UpstreamResponse,
    UpstreamStream,
    UpstreamStreamBroken,
)
from sbactor.providers.config import OpenAIProviderConfig


class OpenAIStream(UpstreamStream):
    def __init__(self, shell: HttpShell, resp: WireResponse,
                 error: UpstreamResponse | None) -> None:
        super().__init__(resp.status, dict(resp.headers.items()), error)
        self._shell = shell
        self._resp = resp

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        async for batch in self.chunk_batches():
            for chunk in batch:
                yield chunk

    async def _drain(self) -> None:
        try:
            await self._resp.drain()
        except Exception:
            pass

    async def chunk_batches(self) -> AsyncIterator[list[dict[str, Any]]]:
        if self.error is not None:
            return
        async for events in self._shell.iter_sse_batches(self._resp):
            batch: list[dict[str, Any]] = []
            for event in events:
                data = event.data.strip()
                if data == "[DONE]":
                    if batch:
                        yield batch
                    await self._drain()
                    return
                if not data:
                    continue
                try:
                    chunk = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise UpstreamStreamBroken(
                        f"provider {self._shell.name!r} ({self._shell.host}): "
                        f"invalid JSON in stream: {data[:120]!r}"
                    ) from None
                if isinstance(chunk, dict):
                    batch.append(chunk)
            if batch:
                yield batch
        raise UpstreamStreamBroken(
            f"provider {self._shell.name!r} ({self._shell.host}): stream ended before [DONE]"
        )


class OpenAIProvider:
    """One shared pooled client; ``Authorization: Bearer`` when a key is configured."""

    def __init__(self, cfg: OpenAIProviderConfig) -> None:
        self.name = cfg.name
        self.config = cfg
        headers = dict(cfg.headers)
        key = resolve_api_key(cfg.api_key, cfg.api_key_env)
        if key:
            headers["authorization"] = f"Bearer {key}"
        self._shell = HttpShell(name=cfg.name, kind="openai", base_url=cfg.base_url,
                                headers=headers, timeout_s=cfg.timeout_s,
                                connect_timeout_s=cfg.connect_timeout_s,
                                max_connections=cfg.max_connections)

    async def chat(self, body: dict[str, Any]) -> UpstreamResponse:
        return await self._shell.post_json("/chat/completions", body)

    @asynccontextmanager
    async def open_chat_stream(self, body: dict[str, Any]) -> AsyncIterator[UpstreamStream]:
        body = {**body, "stream": True}
        async with self._shell.open_stream("/chat/completions", body) as (resp, error):
            yield OpenAIStream(self._shell, resp, error)

    async def embeddings(self, body: dict[str, Any]) -> UpstreamResponse:
        return await self._shell.post_json("/embeddings", body)

    async def aclose(self) -> None:
        await self._shell.aclose()

    def statistics(self) -> ProviderStatistics:
        return self._shell.statistics()
