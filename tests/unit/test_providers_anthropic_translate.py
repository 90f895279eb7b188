"""Pure OpenAI ⇄ Anthropic translation, both directions and the streaming state machine."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sbactor.providers import anthropic_translate as at


def test_request_translation_full() -> None:
    body = {
        "model": "claude-sonnet", "temperature": 0.2, "stop": "END", "user": "u1",
        "stream": True, "stream_options": {"include_usage": True}, "frequency_penalty": 1,
        "messages": [
            {"role": "system", "content": "sys one"},
            {"role": "developer", "content": [{"type": "text", "text": "sys two"}]},
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get", "arguments": '{"q": 1}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
            {"role": "user", "content": "thanks"},
        ],
        "tools": [{"type": "function", "function": {"name": "get", "description": "d",
                                                    "parameters": {"type": "object"}}}],
        "tool_choice": "required", "parallel_tool_calls": False,
    }
    out = at.to_anthropic_request(body, default_max_tokens=777)
    assert out["system"] == "sys one\n\nsys two"
    assert out["max_tokens"] == 777 and out["stop_sequences"] == ["END"]
    assert out["metadata"] == {"user_id": "u1"} and out["stream"] is True
    assert "frequency_penalty" not in out and "stream_options" not in out
    roles = [m["role"] for m in out["messages"]]
    assert roles == ["user", "assistant", "user"]  # tool result merged with next user turn
    images = out["messages"][0]["content"][1:]
    assert images[0]["source"] == {"type": "base64", "media_type": "image/png", "data": "AAAA"}
    assert images[1]["source"] == {"type": "url", "url": "https://x/y.png"}
    assert out["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get", "input": {"q": 1}}]
    assert out["messages"][2]["content"][0] == {
        "type": "tool_result", "tool_use_id": "call_1", "content": "42"}
    assert out["tools"] == [{"name": "get", "description": "d",
                             "input_schema": {"type": "object"}}]
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


def test_max_tokens_precedence() -> None:
    base = {"model": "c", "messages": [{"role": "user", "content": "x"}]}
    assert at.to_anthropic_request({**base, "max_tokens": 5}, 100)["max_tokens"] == 5
    assert at.to_anthropic_request({**base, "max_completion_tokens": 6}, 100)["max_tokens"] == 6
    tc = at.to_anthropic_request({**base, "tool_choice": {"type": "function",
                                                          "function": {"name": "f"}},
                                  "tools": [{"type": "function", "function": {"name": "f"}}]}, 1)
    assert tc["tool_choice"] == {"type": "tool", "name": "f"}


def test_response_translation() -> None:
    msg = {"id": "msg_1", "model": "claude", "stop_reason": "tool_use",
           "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"},
                       {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}],
           "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 3,
                     "cache_creation_input_tokens": 2}}
    out = at.to_openai_response(msg, created=9)
    choice = out["choices"][0]
    assert choice["message"]["content"] == "ab" and choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["id"] == "t1" and json.loads(call["function"]["arguments"]) == {"x": 1}
    assert out["usage"] == {"prompt_tokens": 15, "completion_tokens": 5, "total_tokens": 20,
                            "prompt_tokens_details": {"cached_tokens": 3}}


@pytest.mark.parametrize(("reason", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("tool_use", "tool_calls"), ("refusal", "content_filter"), ("weird_new", "stop")])
def test_stop_reasons(reason: str, finish: str) -> None:
    assert at.finish_reason(reason) == finish


def test_error_translation() -> None:
    over = at.to_openai_error(529, {"type": "error", "error": {"type": "overloaded_error",
                                                              "message": "Overloaded"}}, b"")
    assert over["error"]["type"] == "overloaded_error" and over["error"]["code"] == "overloaded"
    ctx = at.to_openai_error(400, {"type": "error", "error": {
        "type": "invalid_request_error", "message": "prompt is too long: 9 tokens > 8"}}, b"")
    assert ctx["error"]["code"] == "context_length_exceeded"
    html = at.to_openai_error(502, None, b"<html>bad gateway</html>")
    assert "bad gateway" in html["error"]["message"] and html["error"]["type"] == "api_error"


def test_stream_translator_text_tools_usage() -> None:
    t = at.StreamTranslator(include_usage=True, created=1)
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"id": "msg_1", "model": "c",
                                              "usage": {"input_tokens": 7, "output_tokens": 1}}},
        {"type": "ping"},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1,
         "content_block": {"type": "tool_use", "id": "t1", "name": "f", "input": {}}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "input_json_delta", "partial_json": '{"a":'}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "input_json_delta", "partial_json": "1}"}},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
         "usage": {"output_tokens": 12}},
        {"type": "message_stop"},
    ]
    chunks = [c for e in events for c in t.feed(e)]
    assert t.done
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "Hi"}
    start = chunks[2]["choices"][0]["delta"]["tool_calls"][0]
    assert start["index"] == 0 and start["id"] == "t1" and start["function"]["name"] == "f"
    args = "".join(c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                   for c in chunks[3:5])
    assert json.loads(args) == {"a": 1}
    assert chunks[5]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[6]["choices"] == [] and chunks[6]["usage"]["prompt_tokens"] == 7
    assert chunks[6]["usage"]["completion_tokens"] == 12
    assert all(c["id"] == "msg_1" and c["object"] == "chat.completion.chunk" for c in chunks)


def test_stream_translator_error_event() -> None:
    t = at.StreamTranslator()
    with pytest.raises(at.AnthropicStreamError, match="overloaded_error") as info:
        t.feed({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert info.value.type == "overloaded_error"
    assert t.feed({"type": "message_stop"}) == [] and t.done  # no usage chunk unless asked
