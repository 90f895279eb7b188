"""The shared HTTP shell of the HTTP providers: one pooled httpx2 client per provider, transport
errors mapped to ``UpstreamError`` with a readable message, SSE reading with break detection."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import orjson
import trio

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

    def __init__(self, *, name: str, kind: str, base_url: str, headers: Mapping[str, str],
                 timeout_s: float, connect_timeout_s: float, max_connections: int) -> None:
        self.name = name
        self.kind = kind
        self.base_url = base_url.rstrip("/")
        self.host = httpx2.URL(self.base_url).netloc.decode("ascii", "replace")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_connections = max_connections
        self.client = httpx2.AsyncClient(
            headers={"content-type": "application/json", **headers},
            timeout=httpx2.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx2.Limits(max_connections=max_connections,
                                 max_keepalive_connections=max_connections),
            trust_env=False,
        )
        self.requests = 0
        self.in_flight = 0
        self.transport_errors = 0
        self.error_responses = 0

    def statistics(self) -> ProviderStatistics:
        return ProviderStatistics(name=self.name, type=self.kind, requests=self.requests,
                                  in_flight=self.in_flight,
                                  transport_errors=self.transport_errors,
                                  error_responses=self.error_responses)

    async def aclose(self) -> None:
        await self.client.aclose()

    def wrap(self, exc: httpx2.HTTPError, *, streaming: bool = False) -> UpstreamError:
        """Translate an httpx2 exception into our error with host + what happened."""
        self.transport_errors += 1
        who = f"provider {self.name!r} ({self.host})"
        if isinstance(exc, httpx2.ConnectTimeout):
            return UpstreamTimeout(f"{who}: timed out connecting after {self.connect_timeout_s}s")
        if isinstance(exc, httpx2.PoolTimeout):
            return UpstreamTimeout(f"{who}: no free connection within {self.timeout_s}s "
                                   f"(pool of {self.max_connections} busy)")
        if isinstance(exc, httpx2.TimeoutException):
            what = "sending the request" if isinstance(exc, httpx2.WriteTimeout) else (
                "the next stream bytes" if streaming else "the response")
            cls = UpstreamStreamTimeout if streaming else UpstreamTimeout
            return cls(f"{who}: timed out waiting for {what} after {self.timeout_s}s")
        if streaming:
            return UpstreamStreamBroken(f"{who}: stream broke: {exc or type(exc).__name__}")
        if isinstance(exc, httpx2.ConnectError):
            return UpstreamConnectionError(f"{who}: cannot connect: {exc or 'connection refused'}")
        return UpstreamConnectionError(f"{who}: {type(exc).__name__}: {exc or 'connection failed'}")

    def _request(self, path: str, body: Mapping[str, Any],
                 headers: Mapping[str, str] | None) -> httpx2.Request:
        return self.client.build_request("POST", self.base_url + path, content=orjson.dumps(body),
                                         headers=headers)

    async def post_json(self, path: str, body: Mapping[str, Any],
                        headers: Mapping[str, str] | None = None) -> UpstreamResponse:
        self.requests += 1
        self.in_flight += 1
        start = trio.current_time()
        try:
            resp = await self.client.send(self._request(path, body, headers))
        except httpx2.HTTPError as exc:
            raise self.wrap(exc) from exc
        finally:
            self.in_flight -= 1
        if resp.status_code >= 400:
            self.error_responses += 1
        return UpstreamResponse(status=resp.status_code, headers=dict(resp.headers.items()),
                                body=resp.content, json=parse_json(resp.content),
                                latency_s=trio.current_time() - start)

    @asynccontextmanager
    async def open_stream(self, path: str, body: Mapping[str, Any],
                          headers: Mapping[str, str] | None = None
                          ) -> AsyncIterator[tuple[httpx2.Response, UpstreamResponse | None]]:
        """Yield (response, error); error is the fully read non-2xx answer, if any."""
        self.requests += 1
        self.in_flight += 1
        start = trio.current_time()
        try:
            try:
                resp = await self.client.send(self._request(path, body, headers), stream=True)
            except httpx2.HTTPError as exc:
                raise self.wrap(exc) from exc
            try:
                error = None
                if resp.status_code >= 300:
                    self.error_responses += 1
                    try:
                        raw = await resp.aread()
                    except httpx2.HTTPError as exc:
                        raise self.wrap(exc) from exc
                    error = UpstreamResponse(status=resp.status_code,
                                             headers=dict(resp.headers.items()), body=raw,
                                             json=parse_json(raw),
                                             latency_s=trio.current_time() - start)
                yield resp, error
            finally:
                with trio.move_on_after(5, shield=True):
                    await resp.aclose()
        finally:
            self.in_flight -= 1

    async def iter_sse(self, resp: httpx2.Response) -> AsyncIterator[SSEEvent]:
        """SSE events of a response; transport failures become ``UpstreamStreamBroken``."""
        decoder = SSEDecoder()
        try:
            async for line in resp.aiter_lines():
                event = decoder.feed(line)
                if event is not None:
                    yield event
        except httpx2.HTTPError as exc:
            raise self.wrap(exc, streaming=True) from exc
        tail = decoder.flush()
        if tail is not None:
            yield tail
