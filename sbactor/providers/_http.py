"""The shared HTTP shell of the HTTP providers: one connection pool per provider (``_wire``),
transport errors mapped to ``UpstreamError`` with a readable message, SSE reading with break
detection."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio

from sbactor.providers import _wire
from sbactor.providers.base import (
    ProviderStatistics,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamResponse,
    UpstreamStreamBroken,
    UpstreamStreamTimeout,
    UpstreamTimeout,
    parse_json,
)
from sbactor.providers.sse import SSEDecoder, SSEEvent


def resolve_api_key(api_key: str | None, api_key_env: str | None) -> str | None:
    if api_key:
        return api_key
    if api_key_env:
        return os.environ.get(api_key_env) or None
    return None


class HttpShell:
    """Owns the client and the counters; knows nothing about the upstream's dialect."""

    def __init__(
        self,
        *,
        name: str,
        kind: str,
        base_url: str,
        headers: Mapping[str, str],
        timeout_s: float,
        connect_timeout_s: float,
        max_connections: int,
    ) -> None:
        self.name = name
        self.kind = kind
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_connections = max_connections
        self.pool = _wire.WirePool(
            self.base_url,
            headers={"content-type": "application/json", **headers},
            max_connections=max_connections,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=timeout_s,
        )
        self.host = self.pool.origin.netloc
        self.requests = 0
        self.in_flight = 0
        self.transport_errors = 0
        self.error_responses = 0

    def statistics(self) -> ProviderStatistics:
        return ProviderStatistics(
            name=self.name,
            type=self.kind,
            requests=self.requests,
            in_flight=self.in_flight,
            transport_errors=self.transport_errors,
            error_responses=self.error_responses,
        )

    async def aclose(self) -> None:
        await self.pool.aclose()

    def wrap(self, exc: _wire.WireError, *, streaming: bool = False) -> UpstreamError:
        """Translate a transport error into ours, naming the provider and its host."""
        self.transport_errors += 1
        who = f"provider {self.name!r} ({self.host})"
        if isinstance(exc, _wire.WireConnectTimeout | _wire.WirePoolTimeout):
            return UpstreamTimeout(f"{who}: {exc}")
        if isinstance(exc, _wire.WireReadTimeout):
            what = "the next stream bytes" if streaming else "the response"
            cls = UpstreamStreamTimeout if streaming else UpstreamTimeout
            return cls(f"{who}: timed out waiting for {what} after {self.timeout_s}s")
        if streaming:
            return UpstreamStreamBroken(f"{who}: stream broke: {exc}")
        return UpstreamConnectionError(f"{who}: {exc}")

    async def post_json(
        self, path: str, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> UpstreamResponse:
        self.requests += 1
        self.in_flight += 1
        start = trio.current_time()
        try:
            async with self.pool.post(path, orjson.dumps(body), headers) as resp:
                raw = await resp.read()
        except _wire.WireError as exc:
            raise self.wrap(exc) from exc
        finally:
            self.in_flight -= 1
        if resp.status >= 400:
            self.error_responses += 1
        return UpstreamResponse(
            status=resp.status,
            headers=resp.headers,
            body=raw,
            json=parse_json(raw),
            latency_s=trio.current_time() - start,
        )

    @asynccontextmanager
    async def open_stream(
        self, path: str, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[tuple[_wire.WireResponse, UpstreamResponse | None]]:
        """Yield (response, error); error is the fully read non-2xx answer, if any."""
        self.requests += 1
        self.in_flight += 1
        start = trio.current_time()
        try:
            async with self.pool.post(path, orjson.dumps(body), headers) as resp:
                error = None
                if resp.status >= 300:
                    self.error_responses += 1
                    raw = await resp.read()
                    error = UpstreamResponse(
                        status=resp.status,
                        headers=resp.headers,
                        body=raw,
                        json=parse_json(raw),
                        latency_s=trio.current_time() - start,
                    )
                yield resp, error
        except _wire.WireError as exc:
            raise self.wrap(exc) from exc
        finally:
            self.in_flight -= 1

    async def iter_sse(self, resp: _wire.WireResponse) -> AsyncIterator[SSEEvent]:
        """SSE events of a response; transport failures become ``UpstreamStreamBroken``."""
        async for batch in self.iter_sse_batches(resp):
            for event in batch:
                yield event

    async def iter_sse_batches(self, resp: _wire.WireResponse) -> AsyncIterator[list[SSEEvent]]:
        """SSE events grouped by the network read that completed them."""
        decoder = SSEDecoder()
        try:
            async for lines in resp.iter_line_batches():
                events = [e for e in map(decoder.feed, lines) if e is not None]
                if events:
                    yield events
        except _wire.WireError as exc:
            raise self.wrap(exc, streaming=True) from exc
        tail = decoder.flush()
        if tail is not None:
            yield [tail]
