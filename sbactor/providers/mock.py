"""In-process mock provider: no HTTP, OpenAI-shaped answers, markers and failure injection from
``sbactor.upstream_mock.scenarios`` (the same rules as the ``mock-upstream`` server)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from sbactor.providers.base import (
    ProviderStatistics,
    UpstreamResponse,
    UpstreamStream,
    UpstreamStreamBroken,
    make_response,
)
from sbactor.providers.config import MockProviderConfig
from sbactor.upstream_mock import scenarios as sc


class MockStream(UpstreamStream):
    def __init__(self, provider: MockProvider, decision: sc.Decision | None,
                 chunks: list[dict[str, Any]], error: UpstreamResponse | None) -> None:
        super().__init__(error.status if error else 200,
                         error.headers if error else {"content-type": "text/event-stream"}, error)
        self._provider = provider
        self._decision = decision
        self._chunks = chunks

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        d = self._decision
        if self.error is not None or d is None:
            return
        for i, chunk in enumerate(self._chunks):
            if d.cut_after is not None and i >= d.cut_after:
                raise UpstreamStreamBroken(
                    f"provider {self._provider.name!r} (mock): stream cut after {i} chunks")
            if i == 2 and d.stall_s:  # after the role chunk and the first content
                await trio.sleep(d.stall_s)
            elif i > 0 and d.seconds_per_chunk:
                await trio.sleep(d.seconds_per_chunk)
            yield chunk


class MockProvider:
    """Deterministic text, latency via ``trio.sleep``, seeded random failures, markers."""

    def __init__(self, cfg: MockProviderConfig) -> None:
        self.name = cfg.name
        self.config = cfg
        self.engine = sc.ScenarioEngine(sc.Settings(
            latency_ms=cfg.latency_ms, fail_rate=cfg.fail_rate, fail_status=cfg.fail_status,
            refusal_rate=cfg.refusal_rate, seed=cfg.seed, tokens_per_second=cfg.tokens_per_second,
            reply=cfg.reply))
        self._n = 0
        self._in_flight = 0
        self._errors = 0

    def _decide(
        self, body: dict[str, Any]
    ) -> tuple[str, sc.Decision | None, UpstreamResponse | None]:
        self._n += 1
        rid = f"mock{self._n}"
        try:
            d = self.engine.decide(body)
        except sc.MarkerError as exc:
            self._errors += 1
            return rid, None, make_response(400, {}, sc.openai_error_body(str(exc)), 0.0)
        if d.is_error:
            self._errors += 1
            return rid, d, make_response(d.status, sc.error_headers(d),
                                         sc.render_openai_error(d), d.latency_s)
        return rid, d, None

    async def chat(self, body: dict[str, Any]) -> UpstreamResponse:
        self._in_flight += 1
        try:
            start = trio.current_time()
            rid, d, error = self._decide(body)
            if d is not None:
                await trio.sleep(d.latency_s + d.stall_s)
            if error is not None or d is None:
                assert error is not None
                return error
            if d.seconds_per_chunk:
                await trio.sleep(d.seconds_per_chunk * len(sc.text_pieces(d.text)))
            return make_response(200, {}, sc.render_openai_completion(d, rid, int(time.time())),
                                 trio.current_time() - start)
        finally:
            self._in_flight -= 1

    @asynccontextmanager
    async def open_chat_stream(self, body: dict[str, Any]) -> AsyncIterator[UpstreamStream]:
        self._in_flight += 1
        try:
            rid, d, error = self._decide(body)
            if d is not None:
                await trio.sleep(d.latency_s)
            chunks: list[dict[str, Any]] = []
            if d is not None and error is None:
                opts = body.get("stream_options") or {}
                chunks = list(sc.render_openai_chunks(d, rid, int(time.time()),
                                                      bool(opts.get("include_usage"))))
            yield MockStream(self, d, chunks, error)
        finally:
            self._in_flight -= 1

    async def embeddings(self, body: dict[str, Any]) -> UpstreamResponse:
        self._n += 1
        start = trio.current_time()
        await trio.sleep(self.config.latency_ms / 1000.0)
        return make_response(200, {}, sc.render_embeddings(body), trio.current_time() - start)

    async def aclose(self) -> None:
        return None

    def statistics(self) -> ProviderStatistics:
        return ProviderStatistics(name=self.name, type="mock", requests=self._n,
                                  in_flight=self._in_flight, transport_errors=0,
                                  error_responses=self._errors)
