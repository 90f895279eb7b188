"""The Anthropic provider against the mock server's /v1/messages."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2
import pytest
import trio

from sbactor.providers.anthropic import AnthropicProvider
from sbactor.providers.base import UpstreamStreamBroken, build_provider
from sbactor.providers.config import AnthropicProviderConfig
from sbactor.upstream_mock.server import serve_mock


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> AsyncIterator[str]:
    hostport = await nursery.start(lambda task_status: serve_mock(
        "127.0.0.1:0", quiet=True, task_status=task_status))
    yield f"http://{hostport}"


@pytest.fixture
async def provider(upstream: str) -> AsyncIterator[AnthropicProvider]:
    p = build_provider(AnthropicProviderConfig(name="claude", base_url=upstream,
                                               api_key="ak-1", default_max_tokens=64))
    assert isinstance(p, AnthropicProvider)
    yield p
    await p.aclose()


def req(text: str, **extra: object) -> dict[str, object]:
    return {"model": "claude-sonnet", "messages": [{"role": "system", "content": "sys"},
                                                   {"role": "user", "content": text}], **extra}


async def test_chat_translated(upstream: str, provider: AnthropicProvider) -> None:
    r = await provider.chat(req("hello"))
    assert r.status == 200 and r.json is not None
    assert r.json["object"] == "chat.completion"
    assert r.json["choices"][0]["message"]["content"].startswith("Mock reply from claude-sonnet")
    assert r.json["choices"][0]["finish_reason"] == "stop"
    assert r.json["usage"]["completion_tokens"] > 0
    async with httpx2.AsyncClient() as c:
        [rec] = (await c.get(upstream + "/_mock/requests")).json()
    assert rec["path"] == "/v1/messages"
    assert rec["headers"]["x-api-key"] == "ak-1"
    assert rec["headers"]["anthropic-version"] == "2023-06-01"
    assert rec["body"]["system"] == "sys" and rec["body"]["max_tokens"] == 64


async def test_errors_translated(provider: AnthropicProvider) -> None:
    r = await provider.chat(req("[mock:overloaded]"))
    assert r.status == 529 and r.json and r.json["error"]["type"] == "overloaded_error"
    r = await provider.chat(req("[mock:context_length]"))
    assert r.status == 400 and r.json and r.json["error"]["code"] == "context_length_exceeded"
    r = await provider.chat(req("[mock:retry_after=9]"))
    assert r.status == 429 and r.headers["retry-after"] == "9"
    assert r.json and r.json["error"]["type"] == "rate_limit_error"
    r = await provider.chat(req("[mock:content_filter]"))
    assert r.json and r.json["choices"][0]["finish_reason"] == "content_filter"


async def test_stream(provider: AnthropicProvider) -> None:
    async with provider.open_chat_stream(req("hi", stream_options={"include_usage": True})) as s:
        assert s.error is None
        chunks = [c async for c in s.chunks()]
    text = "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in chunks if c["choices"])
    assert text.startswith("Mock reply from claude-sonnet")
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] > 0


async def test_stream_error_and_cut(provider: AnthropicProvider) -> None:
    async with provider.open_chat_stream(req("[mock:overloaded]")) as s:
        assert s.error is not None and s.error.status == 529 and s.error.json
        assert s.error.json["error"]["type"] == "overloaded_error"
    async with provider.open_chat_stream(req("[mock:cut_stream=4]")) as s:
        with pytest.raises(UpstreamStreamBroken, match="claude"):
            async for _ in s.chunks():
                pass


async def test_embeddings_unsupported(provider: AnthropicProvider) -> None:
    r = await provider.embeddings({"model": "x", "input": "y"})
    assert r.status == 400 and r.json and r.json["error"]["code"] == "unsupported"
