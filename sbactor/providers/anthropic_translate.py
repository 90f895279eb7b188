"""OpenAI chat completions ⇄ Anthropic Messages API translation (pure, no I/O).

``to_anthropic_request`` maps a chat request (system messages, images, tools, tool results,
stop sequences, max_tokens default); ``to_openai_response`` / ``to_openai_error`` map answers
back; ``StreamTranslator`` turns Anthropic SSE events into OpenAI ``chat.completion.chunk``s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_ERROR_CODES = {
    "rate_limit_error": "rate_limit_exceeded",
    "overloaded_error": "overloaded",
    "authentication_error": "invalid_api_key",
    "permission_error": "permission_denied",
    "not_found_error": "model_not_found",
    "request_too_large": "request_too_large",
    "api_error": "server_error",
}


class AnthropicStreamError(Exception):
    """The upstream sent an ``error`` event mid-stream (e.g. overloaded_error)."""

    def __init__(self, etype: str, message: str) -> None:
        super().__init__(f"{etype}: {message}")
        self.type = etype


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, Mapping) and p.get("type") in ("text", None))
    return ""


def _image_block(url: str) -> dict[str, Any]:
    if url.startswith("data:") and ";base64," in url:
        media, data = url[5:].split(";base64,", 1)
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    out: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            out.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url", "") if isinstance(image, Mapping) else str(image or "")
            out.append(_image_block(url))
    return out


def _tool_use(call: Mapping[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    raw = fn.get("arguments") or "{}"
    try:
        args = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        args = {"_raw": raw}
    return {"type": "tool_use", "id": call.get("id", ""), "name": fn.get("name", ""),
            "input": args if isinstance(args, dict) else {"value": args}}


def _messages(messages: list[Mapping[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    system: list[str] = []
    out: list[dict[str, Any]] = []

    def push(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:  # Anthropic wants alternating roles: merge
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for m in messages:
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_text(m.get("content")))
        elif role == "user":
            push("user", _blocks(m.get("content")))
        elif role == "assistant":
            blocks = _blocks(m.get("content"))
            blocks += [_tool_use(c) for c in m.get("tool_calls") or []]
            push("assistant", blocks)
        elif role == "tool":
            push("user", [{"type": "tool_result", "tool_use_id": m.get("tool_call_id", ""),
                           "content": _text(m.get("content"))}])
    return ("\n\n".join(s for s in system if s) or None), out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any] | None = None
    if choice == "auto":
        out = {"type": "auto"}
    elif choice == "none":
        out = {"type": "none"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, Mapping) and choice.get("type") == "function":
        out = {"type": "tool", "name": (choice.get("function") or {}).get("name", "")}
    if parallel is False:
        out = {**(out or {"type": "auto"}), "disable_parallel_tool_use": True}
    return out


def to_anthropic_request(body: Mapping[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """An OpenAI chat request as an Anthropic Messages request (unknown fields are dropped)."""
    system, messages = _messages(list(body.get("messages") or []))
    out: dict[str, Any] = {
        "model": body.get("model"),
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens")
        or default_max_tokens,
    }
    if system:
        out["system"] = system
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("stream"):
        out["stream"] = True
    tools = [t.get("function") or {} for t in body.get("tools") or []
             if t.get("type") == "function"]
    if tools:
        out["tools"] = [{"name": f.get("name", ""), "description": f.get("description", ""),
                         "input_schema": f.get("parameters") or {"type": "object",
                                                                 "properties": {}}}
                        for f in tools]
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice and (tools or choice["type"] == "none"):
        out["tool_choice"] = choice
    user = body.get("user")
    if user:
        out["metadata"] = {"user_id": str(user)}
    return out


def to_openai_usage(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    u = usage or {}
    cached = int(u.get("cache_read_input_tokens") or 0)
    prompt = int(u.get("input_tokens") or 0) + cached + int(
        u.get("cache_creation_input_tokens") or 0)
    completion = int(u.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(stop_reason: str | None) -> str | None:
    return None if stop_reason is None else STOP_REASONS.get(stop_reason, "stop")


def to_openai_response(msg: Mapping[str, Any], created: int) -> dict[str, Any]:
    """An Anthropic message as an OpenAI ``chat.completion``."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in msg.get("content") or []:
        if block.get("type") == "text":
            texts.append(block.get("text", ""))
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id", ""), "type": "function",
                          "function": {"name": block.get("name", ""),
                                       "arguments": json.dumps(block.get("input") or {})}})
    message: dict[str, Any] = {"role": "assistant",
                               "content": "".join(texts) if texts else None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": msg.get("id", ""), "object": "chat.completion", "created": created,
        "model": msg.get("model", ""),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish_reason(msg.get("stop_reason")) or "stop"}],
        "usage": to_openai_usage(msg.get("usage")),
    }


def to_openai_error(status: int, body: Mapping[str, Any] | None, raw: bytes) -> dict[str, Any]:
    """Anthropic's error body in OpenAI's shape; ``type`` keeps Anthropic's error type."""
    err = (body or {}).get("error")
    if not isinstance(err, Mapping):
        text = raw.decode("utf-8", "replace")[:500] or f"HTTP {status}"
        return {"error": {"message": text, "type": "api_error", "param": None, "code": None}}
    etype = str(err.get("type") or "api_error")
    message = str(err.get("message") or etype)
    code = _ERROR_CODES.get(etype)
    lowered = message.lower()
    if etype == "invalid_request_error" and ("too long" in lowered or "context" in lowered):
        code = "context_length_exceeded"
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


@attrs.define
class StreamTranslator:
    """Anthropic SSE events in, OpenAI chunks out. ``done`` turns true on ``message_stop``."""

    include_usage: bool = False
    created: int = 0
    done: bool = False
    _id: str = ""
    _model: str = ""
    _usage: dict[str, Any] = attrs.field(factory=dict)
    _tool_index: dict[int, int] = attrs.field(factory=dict)

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": self._id, "object": "chat.completion.chunk", "created": self.created,
                "model": self._model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]}

    def feed(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Chunks for one event's data (its ``type`` decides); raises ``AnthropicStreamError``."""
        kind = event.get("type")
        if kind == "message_start":
            msg = event.get("message") or {}
            self._id, self._model = msg.get("id", ""), msg.get("model", "")
            self._usage.update(msg.get("usage") or {})
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") != "tool_use":
                return []
            index = len(self._tool_index)
            self._tool_index[int(event.get("index", 0))] = index
            return [self._chunk({"tool_calls": [{
                "index": index, "id": block.get("id", ""), "type": "function",
                "function": {"name": block.get("name", ""), "arguments": ""}}]})]
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                return [self._chunk({"content": delta.get("text", "")})]
            if delta.get("type") == "input_json_delta":
                index = self._tool_index.get(int(event.get("index", 0)), 0)
                return [self._chunk({"tool_calls": [{
                    "index": index, "function": {"arguments": delta.get("partial_json", "")}}]})]
            return []  # thinking / signature deltas have no OpenAI equivalent
        if kind == "message_delta":
            self._usage.update({k: v for k, v in (event.get("usage") or {}).items()
                                if v is not None})
            reason = finish_reason((event.get("delta") or {}).get("stop_reason"))
            return [self._chunk({}, reason or "stop")]
        if kind == "message_stop":
            self.done = True
            if not self.include_usage:
                return []
            last = self._chunk({})
            last["choices"] = []
            last["usage"] = to_openai_usage(self._usage)
            return [last]
        if kind == "error":
            err = event.get("error") or {}
            raise AnthropicStreamError(str(err.get("type", "api_error")),
                                       str(err.get("message", "")))
        return []  # ping, content_block_stop, unknown future events
