"""The in-process mock provider: markers, latency on the trio clock, streams, config."""

from __future__ import annotations

import pytest
import trio

from sbactor.providers.base import Provider, UpstreamStreamBroken, build_provider
from sbactor.providers.config import MockProviderConfig
from sbactor.providers.mock import MockProvider


def req(text: str, model: str = "mock-small", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def mock(**kw: object) -> MockProvider:
    p = build_provider(MockProviderConfig(name="local", **kw))  # type: ignore[arg-type]
    assert isinstance(p, MockProvider) and isinstance(p, Provider)
    return p


async def test_chat_ok_with_latency(autojump_clock: trio.abc.Clock) -> None:
    p = mock(latency_ms=250)
    start = trio.current_time()
    r = await p.chat(req("hello"))
    assert trio.current_time() - start == pytest.approx(0.25)
    assert r.status == 200 and r.json is not None and r.headers["content-type"]
    assert r.json["choices"][0]["message"]["content"].startswith("Mock reply")
    assert r.json["usage"]["total_tokens"] > 0 and r.latency_s == pytest.approx(0.25)


async def test_reply_override_and_markers() -> None:
    p = mock(reply="fixed")
    r = await p.chat(req("x"))
    assert r.json and r.json["choices"][0]["message"]["content"] == "fixed"
    r = await p.chat(req("[mock:status=429,retry_after=2]"))
    assert r.status == 429 and r.headers["retry-after"] == "2"
    assert r.json and r.json["error"]["code"] == "rate_limit_exceeded"
    r = await p.chat(req("[mock:context_length]"))
    assert r.status == 400 and r.json and r.json["error"]["code"] == "context_length_exceeded"
    r = await p.chat(req("[mock:bogus]"))
    assert r.status == 400 and r.json and "bogus" in r.json["error"]["message"]


async def test_429_then_200_and_fallback_model() -> None:
    p = mock()
    text = "[mock:status=429,times=1,id=q]"
    assert [(await p.chat(req(text))).status for _ in range(2)] == [429, 200]
    only = "[mock:status=503,only_model=primary]"
    assert (await p.chat(req(only, model="primary"))).status == 503
    assert (await p.chat(req(only, model="backup"))).status == 200


async def test_fail_rate_seeded() -> None:
    p = mock(fail_rate=1.0, fail_status=502, seed=1)
    assert (await p.chat(req("x"))).status == 502
    p = mock(refusal_rate=1.0, seed=1)
    r = await p.chat(req("x"))
    assert r.json and r.json["choices"][0]["message"]["refusal"]


async def test_stream_full_and_usage() -> None:
    p = mock()
    async with p.open_chat_stream(req("hi", stream_options={"include_usage": True})) as s:
        assert s.error is None and s.status == 200
        chunks = [c async for c in s.chunks()]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["prompt_tokens"] > 0
    assert p.statistics().in_flight == 0 and p.statistics().requests == 1


async def test_stream_cut_and_error() -> None:
    p = mock()
    got = []
    async with p.open_chat_stream(req("[mock:cut_stream=2]")) as s:
        with pytest.raises(UpstreamStreamBroken):
            async for c in s.chunks():
                got.append(c)
    assert len(got) == 2
    async with p.open_chat_stream(req("[mock:overloaded]")) as s:
        assert s.error is not None and s.error.status == 529
        assert [c async for c in s.chunks()] == []


async def test_stream_stall_and_pacing(autojump_clock: trio.abc.Clock) -> None:
    p = mock(tokens_per_second=10.0)
    start = trio.current_time()
    async with p.open_chat_stream(req("[mock:stall=1000]")) as s:
        n = len([c async for c in s.chunks()])
    elapsed = trio.current_time() - start
    assert n > 3 and elapsed > 1.0


async def test_embeddings() -> None:
    r = await mock().embeddings({"model": "e", "input": "abc"})
    assert r.status == 200 and r.json and len(r.json["data"][0]["embedding"]) == 16


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="fail_rate"):
        MockProviderConfig(name="m", fail_rate=2.0)
    with pytest.raises(ValueError, match="fail_status"):
        MockProviderConfig(name="m", fail_status=200)
