"""LLM-aware resilience end to end: real gateway, real mock upstream, failures chosen by markers.

Each case puts a ``[mock:...]`` marker in the last user message (docs/mock-upstream.md) and checks
what the client got, what the upstream received and what the usage event recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import trio
import yaml

from sbactor.config import parse_config
from tests.conftest import REPO, MockUpstream, RunningGateway, StartGateway, StartMock, mock_config

EXAMPLE = REPO / "examples" / "llm-aware-resilience" / "sbactor.yaml"

# Small waits so retries do not slow the suite; the jittered backoff stays far below any
# Retry-After the tests ask for, so a recorded delay tells which one was used.
FAST = {"backoff_base_s": 0.001, "backoff_max_s": 0.002}


def _model(name: str, upstream_model: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "deployments": [{"provider": "up", "model": upstream_model}], **fields}


def _config(upstream: MockUpstream, *, models: list[dict[str, Any]] | None = None,
            **resilience: Any) -> dict[str, Any]:
    cfg = mock_config(upstream, resilience={**FAST, **resilience},
                      usage_sinks=[{"type": "jsonl", "path": "usage.jsonl"}])
    if models is not None:
        cfg["models"] = models
    return cfg


async def _events(gw: RunningGateway, count: int) -> list[dict[str, Any]]:
    """The first ``count`` usage events (the jsonl sink flushes each batch; poll until there)."""
    path = gw.data_dir / "usage.jsonl"
    with trio.fail_after(10):
        while True:
            if path.exists():
                lines = path.read_bytes().splitlines()
                if len(lines) >= count:
                    return [orjson.loads(line) for line in lines[:count]]
            await trio.sleep(0.01)


def _upstream_models(upstream: MockUpstream) -> list[str]:
    return [body["model"] for body in upstream.received()]


async def _sse(gw: RunningGateway, content: str, model: str = "m") -> tuple[Any, list[str]]:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": content}]}
    with trio.fail_after(10):  # a hang is a failure, never a stuck suite
        async with gw.client.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    return r, lines


def _text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# -- retries -------------------------------------------------------------------------------------


async def test_429_then_200_is_served_with_two_attempts(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream))
    r = await gw.chat("hello [mock:status=429,times=1,id=r1]")
    assert r.status_code == 200, r.text
    assert r.headers["x-sbactor-attempts"] == "2"
    assert r.json()["choices"][0]["message"]["content"]
    assert _upstream_models(mock_upstream) == ["up-m", "up-m"]
    (event,) = await _events(gw, 1)
    assert event["kind"] == "completion"
    attempts = event["attempts"]
    assert [a["class"] for a in attempts] == ["rate_limit", "ok"]
    assert [a["status"] for a in attempts] == [429, 200]
    assert [a["reason"] for a in attempts] == ["first", "retry"]
    # a retry goes back to the same deployment (it is not cooling down)
    assert [a["deployment"] for a in attempts] == ["m/up/0", "m/up/0"]


async def test_retry_after_is_honoured(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream))
    t0 = trio.current_time()
    r = await gw.chat("wait please [mock:retry_after=1,times=1,id=ra]")
    elapsed = trio.current_time() - t0
    assert r.status_code == 200, r.text
    (event,) = await _events(gw, 1)
    delays = [a["delay_s"] for a in event["attempts"]]
    assert delays == [0.0, 1.0]  # the upstream's Retry-After, not the (tiny) jittered backoff
    assert elapsed >= 1.0  # and the gateway really waited it out


async def test_retry_after_is_capped(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream, max_retry_after_s=0.05))
    r = await gw.chat("[mock:retry_after=30,times=1,id=cap]")
    assert r.status_code == 200, r.text
    (event,) = await _events(gw, 1)
    assert [a["delay_s"] for a in event["attempts"]] == [0.0, 0.05]


async def test_500_retried_up_to_the_count_then_502(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream, retry_policy={"server_error": 2}))
    r = await gw.chat("[mock:status=500]")
    assert r.status_code == 502, r.text
    assert r.headers["x-sbactor-attempts"] == "3"
    error = r.json()["error"]
    assert error["code"] == "upstream_server_error"
    assert "retries exhausted (2 of 2)" in error["message"]
    assert len(mock_upstream.received()) == 3  # the first attempt and two retries, no more
    (event,) = await _events(gw, 1)
    assert event["kind"] == "error" and event["status"] == 502
    assert [a["class"] for a in event["attempts"]] == ["server_error"] * 3


async def test_401_is_not_retried_and_is_a_clear_502(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream))
    r = await gw.chat("[mock:auth]")
    assert r.status_code == 502, r.text  # the client's key was fine; the gateway's was not
    assert r.headers["x-sbactor-attempts"] == "1"
    error = r.json()["error"]
    assert error["code"] == "upstream_auth_failed"
    assert "auth (401)" in error["message"] and "not retried" in error["message"]
    assert "Traceback" not in r.text
    assert len(mock_upstream.received()) == 1


async def test_auth_failure_falls_back_only_to_another_provider(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    cfg = _config(mock_upstream, models=[
        _model("a", "up-a", fallbacks=["same"]),
        _model("b", "up-b", fallbacks=["same", "other"]),
        _model("same", "up-same"),
        {"name": "other", "deployments": [{"provider": "up2", "model": "up-other"}]},
    ])
    cfg["providers"].append({**cfg["providers"][0], "name": "up2"})
    gw = await start_gateway(cfg)
    # the provider that rejected the key is excluded: "same" (on it too) cannot be tried, and the
    # client still learns the real cause, not "no deployment available"
    r = await gw.chat("[mock:auth]", model="a")
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["code"] == "upstream_auth_failed"
    assert "auth (401)" in error["message"]
    assert _upstream_models(mock_upstream) == ["up-a"]
    # a fallback on another provider serves the request
    r = await gw.chat("[mock:auth][mock:only_model=up-b]", model="b")
    assert r.status_code == 200, r.text
    assert r.headers["x-sbactor-model"] == "other"
    assert r.headers["x-sbactor-provider"] == "up2"
    assert _upstream_models(mock_upstream)[1:] == ["up-b", "up-other"]


async def test_disabled_resilience_makes_one_attempt(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream, enabled=False))
    r = await gw.chat("[mock:status=429,times=1,id=off]")
    assert r.status_code == 429, r.text
    assert len(mock_upstream.received()) == 1


# -- typed fallbacks -----------------------------------------------------------------------------


async def test_context_window_overflow_goes_to_the_context_window_fallback(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    models = [
        _model("m", "up-m", fallbacks=["general"], context_window_fallbacks=["big"]),
        _model("big", "up-big"),
        _model("general", "up-general"),
    ]
    gw = await start_gateway(_config(mock_upstream, models=models))
    r = await gw.chat("long story [mock:context_length][mock:only_model=up-m]")
    assert r.status_code == 200, r.text
    assert r.headers["x-sbactor-model"] == "big"
    assert r.headers["x-sbactor-attempts"] == "2"
    assert r.json()["model"] == "big"
    # context_window is never retried on the same model, and the general list is not used
    assert _upstream_models(mock_upstream) == ["up-m", "up-big"]
    (event,) = await _events(gw, 1)
    assert event["requested_model"] == "m" and event["routed_model"] == "big"
    assert [(a["class"], a["reason"]) for a in event["attempts"]] == [
        ("context_window", "first"), ("ok", "context_window_fallback")]


async def test_context_window_compress_and_retry(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream, on_context_window="compress"))
    old = "an old and very long digression " * 200
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": old},
        {"role": "assistant", "content": old},
        {"role": "user", "content": "and now? [mock:context_length,times=1,id=cmp]"},
    ]
    r = await gw.client.post("/v1/chat/completions", json={"model": "m", "messages": messages})
    assert r.status_code == 200, r.text
    assert r.headers["x-sbactor-attempts"] == "2"
    first, second = mock_upstream.received()
    assert len(first["messages"]) == 4
    # the oldest turn went; the system prompt and the last user turn stayed
    assert [m["role"] for m in second["messages"]] == ["system", "user"]
    assert second["messages"][0]["content"] == "be brief"
    assert second["messages"][-1]["content"].startswith("and now?")
    (event,) = await _events(gw, 1)
    assert "context_compressed" in event["tags"]
    assert [a["reason"] for a in event["attempts"]] == ["first", "compressed"]


async def test_context_window_without_fallback_or_compression_is_a_400(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream))
    r = await gw.chat("[mock:context_length]")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert len(mock_upstream.received()) == 1


async def test_content_filter_goes_to_the_content_policy_fallback(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    models = [_model("m", "up-m", content_policy_fallbacks=["other"]), _model("other", "up-o")]
    gw = await start_gateway(_config(mock_upstream, models=models))
    r = await gw.chat("tell me [mock:content_filter][mock:only_model=up-m]")
    assert r.status_code == 200, r.text
    assert r.headers["x-sbactor-model"] == "other"
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert _upstream_models(mock_upstream) == ["up-m", "up-o"]
    (event,) = await _events(gw, 1)
    assert [(a["class"], a["reason"]) for a in event["attempts"]] == [
        ("content_policy", "first"), ("ok", "content_policy_fallback")]


async def test_content_filter_without_fallback_serves_the_refusal_as_is(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream))
    r = await gw.chat("tell me [mock:content_filter]")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "content_filter"
    assert r.headers["x-sbactor-attempts"] == "1"
    assert len(mock_upstream.received()) == 1  # content_policy is never retried
    (event,) = await _events(gw, 1)
    assert event["kind"] == "completion"
    assert event["finish_reason"] == "content_filter"
    assert [a["class"] for a in event["attempts"]] == ["content_policy"]


async def test_fallback_cycles_are_impossible(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    models = [_model("a", "up-a", fallbacks=["b"]), _model("b", "up-b", fallbacks=["a"])]
    gw = await start_gateway(_config(mock_upstream, models=models,
                                     retry_policy={"server_error": 1}))
    r = await gw.chat("[mock:status=503]", model="a")
    assert r.status_code == 502, r.text
    # a, its retry, then b and its retry: b's fallback back to a is not taken, a's retries not rerun
    assert _upstream_models(mock_upstream) == ["up-a", "up-a", "up-b", "up-b"]


# -- streams -------------------------------------------------------------------------------------


async def test_stream_cut_before_first_byte_fails_over(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    models = [_model("m", "up-m", fallbacks=["m2"]), _model("m2", "up-m2")]
    gw = await start_gateway(_config(mock_upstream, models=models,
                                     retry_policy={"connection": 1}))
    r, lines = await _sse(gw, "go [mock:cut_before_first][mock:only_model=up-m]")
    assert r.status_code == 200
    assert r.headers["x-sbactor-model"] == "m2"
    assert lines[-1] == "[DONE]"
    chunks = [orjson.loads(line) for line in lines[:-1]]
    assert _text(chunks)
    assert all("error" not in c for c in chunks)
    # a retry on the same model (connection), then the general fallback
    assert _upstream_models(mock_upstream) == ["up-m", "up-m", "up-m2"]
    (event,) = await _events(gw, 1)
    assert [(a["class"], a["reason"]) for a in event["attempts"]] == [
        ("connection", "first"), ("connection", "retry"), ("ok", "fallback")]


async def test_stream_cut_mid_stream_ends_with_an_error_chunk_and_no_done(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream))
    r, lines = await _sse(gw, "go [mock:cut_stream=4]")
    assert r.status_code == 200
    assert "[DONE]" not in lines
    chunks = [orjson.loads(line) for line in lines]
    *content, last = chunks
    assert _text(content)  # what was streamed before the cut reached the client
    assert last["object"] == "chat.completion.chunk" and last["choices"] == []
    assert last["error"]["type"] == "upstream_error"
    assert "mid-stream" in last["error"]["message"]
    assert len(mock_upstream.received()) == 1  # committed: no failover after the first byte
    (event,) = await _events(gw, 1)
    assert event["kind"] == "error" and event["status"] == 502
    assert event["error"]["mid_stream"] is True


async def test_stream_cut_mid_stream_makes_the_openai_sdk_raise(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream))
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    pieces: list[str] = []
    with trio.fail_after(10), pytest.raises(openai.APIError, match="mid-stream"):
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "go [mock:cut_stream=4]"}],
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
    assert "".join(pieces)  # the partial answer arrived before the error
    await client.close()


async def test_stream_stall_is_a_timeout(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream, stream_idle_timeout_s=0.2))
    r, lines = await _sse(gw, "go [mock:stall=20000]")
    assert r.status_code == 200
    assert "[DONE]" not in lines
    last = orjson.loads(lines[-1])
    assert last["error"]["code"] == "upstream_timeout"
    assert "timeout" in last["error"]["message"]
    (event,) = await _events(gw, 1)
    assert event["error"]["class"] == "timeout"


# -- cooldowns and the deadline ------------------------------------------------------------------


async def test_cooldown_moves_traffic_to_the_other_deployment(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    models = [{"name": "m", "routing": "fallback_chain", "deployments": [
        {"provider": "up", "model": "up-a"}, {"provider": "up", "model": "up-b"}]}]
    cfg = _config(mock_upstream, models=models, allowed_fails=2, cooldown_s=600,
                  retry_policy={"server_error": 2})
    gw = await start_gateway(cfg)
    before = (await gw.client.get("/admin/routing")).json()["cooldowns"]
    assert not any(d["cooling"] for d in before.values())

    r = await gw.chat("[mock:status=500][mock:only_model=up-a]")
    assert r.status_code == 200, r.text
    # two failures on a bench it; the second retry skips it for b
    assert _upstream_models(mock_upstream) == ["up-a", "up-a", "up-b"]
    (event,) = await _events(gw, 1)
    assert [a["deployment"] for a in event["attempts"]] == ["m/up/0", "m/up/0", "m/up/1"]

    cooldowns = (await gw.client.get("/admin/routing")).json()["cooldowns"]
    assert cooldowns["m/up/0"]["cooling"] is True
    assert cooldowns["m/up/0"]["cooldown_remaining_s"] > 0
    assert cooldowns["m/up/0"]["last_failure_class"] == "server_error"
    assert cooldowns.get("m/up/1", {}).get("cooling") is not True

    # fallback_chain would pick a first; while it cools, every request goes straight to b
    for i in range(4):
        r = await gw.chat(f"healthy {i} [mock:status=500][mock:only_model=up-a]")
        assert r.status_code == 200, r.text
        assert r.headers["x-sbactor-attempts"] == "1"
    assert _upstream_models(mock_upstream)[3:] == ["up-b"] * 4


async def test_rate_limit_cooldown_lasts_as_long_as_retry_after(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    cfg = _config(mock_upstream, allowed_fails=1, cooldown_s=1, max_retry_after_s=60,
                  request_deadline_s=5)
    gw = await start_gateway(cfg)
    r = await gw.chat("[mock:status=429,retry_after=40]")
    assert r.status_code == 429, r.text
    cooldowns = (await gw.client.get("/admin/routing")).json()["cooldowns"]
    assert cooldowns["m/up/0"]["cooling"] is True
    # the upstream asked for 40 s, longer than cooldown_s: the deployment is benched that long
    assert cooldowns["m/up/0"]["cooldown_remaining_s"] > 30


async def test_request_deadline_bounds_a_slow_upstream(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream, request_deadline_s=0.3))
    t0 = trio.current_time()
    r = await gw.chat("[mock:latency=20000]")
    elapsed = trio.current_time() - t0
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert elapsed < 20  # bounded by the deadline, not by the upstream


async def test_request_deadline_skips_a_retry_that_would_not_fit(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gw = await start_gateway(_config(mock_upstream, request_deadline_s=5))
    r = await gw.chat("[mock:status=429,retry_after=20]")
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "20"
    assert r.headers["x-sbactor-attempts"] == "1"
    assert len(mock_upstream.received()) == 1  # no wait past the deadline, no pointless retry


# -- the example ---------------------------------------------------------------------------------


async def test_example_config_serves_through_failures(
    start_gateway: StartGateway, start_mock: StartMock, tmp_path: Path
) -> None:
    mock = await start_mock()
    config = parse_config(yaml.safe_load(EXAMPLE.read_text()),
                          env={"MOCK_UPSTREAM_URL": mock.openai_base})
    gw = await start_gateway(config)
    r = await gw.chat("hi [mock:status=429,times=1,id=ex]", model="gpt-4o")
    assert r.status_code == 200, r.text
    assert r.headers["x-sbactor-attempts"] == "2"
    r = await gw.chat("long [mock:context_length][mock:only_model=gpt-4o]", model="gpt-4o")
    assert r.status_code == 200, r.text
    assert r.headers["x-sbactor-model"] == "gpt-4.1"
    r = await gw.chat("hm [mock:content_filter][mock:only_model=gpt-4o]", model="gpt-4o")
    assert r.status_code == 200, r.text
    assert r.headers["x-sbactor-model"] == "claude-sonnet"


async def test_stream_cut_after_the_empty_opening_chunk_still_fails_over(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    """The role-only opening chunk carries no answer: a cut right after it can fail over."""
    gw = await start_gateway(_config(mock_upstream))
    r, lines = await _sse(gw, "go [mock:cut_stream=1,times=1,id=cut-after-role]")
    assert r.status_code == 200
    assert r.headers["x-sbactor-attempts"] == "2"
    assert lines[-1] == "[DONE]"
    roles = [orjson.loads(x)["choices"][0]["delta"].get("role") for x in lines[:-1]
             if orjson.loads(x).get("choices")]
    assert roles.count("assistant") == 1  # the held-back opening chunk was not sent twice
