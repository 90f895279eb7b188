"""The mock server on a loopback port, exercised through the OpenAI provider."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2
import pytest
import trio

from sbactor.providers.base import (
    UpstreamConnectionError,
    UpstreamStreamBroken,
    UpstreamTimeout,
    build_provider,
)
from sbactor.providers.config import OpenAIProviderConfig
from sbactor.providers.openai import OpenAIProvider
from sbactor.upstream_mock.scenarios import Settings
from sbactor.upstream_mock.server import MockUpstreamApp, serve_mock


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> AsyncIterator[str]:
    hostport = await nursery.start(lambda task_status: serve_mock(
        "127.0.0.1:0", Settings(), quiet=True, task_status=task_status))
    yield f"http://{hostport}"
    nursery.cancel_scope.cancel()


@pytest.fixture
async def provider(upstream: str) -> AsyncIterator[OpenAIProvider]:
    p = build_provider(OpenAIProviderConfig(name="up", base_url=upstream + "/v1",
                                            api_key="sk-test", headers={"x-extra": "1"},
                                            timeout_s=5))
    assert isinstance(p, OpenAIProvider)
    yield p
    await p.aclose()


def req(text: str, **extra: object) -> dict[str, object]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}],
            "temperature": 0.3, **extra}


async def recorded(upstream: str) -> list[dict[str, object]]:
    async with httpx2.AsyncClient() as c:
        return (await c.get(upstream + "/_mock/requests")).json()


async def test_chat_json_and_recorded_request(upstream: str, provider: OpenAIProvider) -> None:
    r = await provider.chat(req("hello"))
    assert r.status == 200 and r.json is not None and r.latency_s > 0
    assert r.headers["content-type"] == "application/json"
    assert r.json["choices"][0]["message"]["content"].startswith("Mock reply from gpt-4o-mini")
    [rec] = await recorded(upstream)
    assert rec["path"] == "/v1/chat/completions"
    assert rec["body"] == req("hello")  # every field passed through
    headers = rec["headers"]
    assert isinstance(headers, dict)
    assert headers["authorization"] == "Bearer sk-test" and headers["x-extra"] == "1"
    async with httpx2.AsyncClient() as c:
        assert (await c.delete(upstream + "/_mock/requests")).status_code == 200
    assert await recorded(upstream) == []


async def test_errors_are_returned(provider: OpenAIProvider) -> None:
    r = await provider.chat(req("[mock:status=429,retry_after=4]"))
    assert r.status == 429 and r.headers["retry-after"] == "4"
    assert r.json and r.json["error"]["code"] == "rate_limit_exceeded"
    r = await provider.chat(req("[mock:auth]"))
    assert r.status == 401
    times = "[mock:status=500,times=1,id=srv]"
    assert [(await provider.chat(req(times))).status for _ in range(2)] == [500, 200]
    assert provider.statistics().error_responses == 3


async def test_stream_ok_with_usage(provider: OpenAIProvider) -> None:
    body = req("hi", stream_options={"include_usage": True})
    async with provider.open_chat_stream(body) as s:
        assert s.status == 200 and s.error is None
        assert s.headers["content-type"] == "text/event-stream"
        chunks = [c async for c in s.chunks()]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[-1]["usage"]["total_tokens"] > 0


async def test_stream_error_body_read(provider: OpenAIProvider) -> None:
    async with provider.open_chat_stream(req("[mock:context_length]")) as s:
        assert s.status == 400 and s.error is not None and s.error.json
        assert s.error.json["error"]["code"] == "context_length_exceeded"
        assert [c async for c in s.chunks()] == []


@pytest.mark.parametrize(("marker", "expected"), [("cut_stream=3", 3), ("cut_before_first", 0)])
async def test_cut_stream_raises_broken(provider: OpenAIProvider, marker: str,
                                        expected: int) -> None:
    got = []
    async with provider.open_chat_stream(req(f"[mock:{marker}]")) as s:
        with pytest.raises(UpstreamStreamBroken, match="up"):
            async for c in s.chunks():
                got.append(c)
    assert len(got) == expected
    # the pool recovers: next request works
    assert (await provider.chat(req("after"))).status == 200


async def test_early_exit_closes_upstream(provider: OpenAIProvider) -> None:
    async with provider.open_chat_stream(req("[mock:tokens=50]")) as s:
        async for _ in s.chunks():
            break
    assert provider.statistics().in_flight == 0
    assert (await provider.chat(req("again"))).status == 200


async def test_embeddings_and_models(upstream: str, provider: OpenAIProvider) -> None:
    r = await provider.embeddings({"model": "e", "input": ["a", "b"]})
    assert r.status == 200 and r.json and len(r.json["data"]) == 2
    async with httpx2.AsyncClient() as c:
        models = (await c.get(upstream + "/v1/models")).json()
        assert models["object"] == "list" and models["data"]
        assert (await c.get(upstream + "/healthz")).json() == {"status": "ok"}
        bad = await c.post(upstream + "/v1/chat/completions", content=b"{nope")
        assert bad.status_code == 400 and "invalid JSON" in bad.json()["error"]["message"]


async def test_timeouts(upstream: str) -> None:
    p = OpenAIProvider(OpenAIProviderConfig(name="slow", base_url=upstream + "/v1",
                                            timeout_s=0.2))
    try:
        with pytest.raises(UpstreamTimeout, match=r"slow.*timed out waiting for the response"):
            await p.chat(req("[mock:latency=3000]"))
        async with p.open_chat_stream(req("[mock:stall=3000]")) as s:
            with pytest.raises(UpstreamTimeout) as info:
                async for _ in s.chunks():
                    pass
            assert isinstance(info.value, UpstreamStreamBroken)
    finally:
        await p.aclose()


async def test_connection_refused() -> None:
    with trio.socket.socket() as sock:  # find a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = OpenAIProvider(OpenAIProviderConfig(name="gone", base_url=f"http://127.0.0.1:{port}/v1"))
    with pytest.raises(UpstreamConnectionError, match=r"gone.*127\.0\.0\.1"):
        await p.chat(req("x"))
    await p.aclose()


async def test_global_settings_fail_rate(nursery: trio.Nursery) -> None:
    app = MockUpstreamApp(Settings(fail_rate=1.0, fail_status=503, seed=3))
    hostport = await nursery.start(lambda task_status: serve_mock(
        "127.0.0.1:0", app=app, quiet=True, task_status=task_status))
    p = OpenAIProvider(OpenAIProviderConfig(name="f", base_url=f"http://{hostport}/v1"))
    assert (await p.chat(req("x"))).status == 503
    await p.aclose()
    assert app.served == 1
