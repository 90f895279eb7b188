"""Scenario markers and deterministic fake answers, shared by the in-process mock provider and
the ``sbactor mock-upstream`` server (pure: no I/O, no trio).

A request chooses its fate with markers like ``[mock:status=429,times=1,id=a]`` in the last user
message; global knobs (``Settings``) add latency and random failures. ``ScenarioEngine.decide``
turns a request into a ``Decision``; the ``render_*`` helpers turn a decision into OpenAI or
Anthropic shaped bodies, chunks and events.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

MARKER_RE = re.compile(r"\[mock:([^\]]*)\]")

_FLAGS = {"context_length", "content_filter", "refusal", "cut_before_first", "overloaded", "auth"}
_INTS = {"status", "times", "cut_stream", "stall", "latency", "retry_after", "tokens"}
_STRS = {"id", "only_model"}

_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()

REFUSAL_TEXT = "I'm sorry, but I can't help with that request."


class MarkerError(ValueError):
    """A ``[mock:...]`` marker could not be parsed."""


@attrs.frozen
class Markers:
    """What the markers in one request asked for (all optional)."""

    status: int | None = None
    times: int | None = None
    id: str | None = None
    context_length: bool = False
    content_filter: bool = False
    refusal: bool = False
    cut_stream: int | None = None
    cut_before_first: bool = False
    stall_ms: int | None = None
    latency_ms: int | None = None
    retry_after: int | None = None
    overloaded: bool = False
    auth: bool = False
    only_model: str | None = None
    tokens: int | None = None
    source: str = ""


@attrs.frozen
class Settings:
    """Global knobs of a mock upstream (CLI flags or ``MockProviderConfig``)."""

    latency_ms: float = 0.0
    fail_rate: float = 0.0
    fail_status: int = 500
    refusal_rate: float = 0.0
    seed: int | None = None
    tokens_per_second: float | None = None
    reply: str | None = None


@attrs.frozen
class Decision:
    """The fate of one request: an error, or an answer with optional stream faults."""

    status: int = 200
    error_kind: str | None = None  # rate_limit | server | context_length | overloaded | auth
    retry_after: int | None = None
    latency_s: float = 0.0
    stall_s: float = 0.0
    refusal: bool = False
    content_filter: bool = False
    cut_after: int | None = None  # stream this many chunks then drop the connection
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = "mock"
    seconds_per_chunk: float = 0.0

    @property
    def is_error(self) -> bool:
        return self.status >= 400


def parse_markers(text: str) -> Markers:
    """Merge every ``[mock:k=v,flag]`` group found in ``text`` into one ``Markers``."""
    values: dict[str, Any] = {}
    found = MARKER_RE.findall(text)
    for group in found:
        for item in group.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, raw = item.partition("=")
            key = key.strip()
            raw = raw.strip()
            if key in _FLAGS and not sep:
                values[key] = True
            elif key in _INTS and sep:
                try:
                    number = int(raw)
                except ValueError:
                    raise MarkerError(
                        f"[mock:{group}]: {key} needs an integer, got {raw!r}") from None
                values[{"stall": "stall_ms", "latency": "latency_ms"}.get(key, key)] = number
            elif key in _STRS and sep:
                values[key] = raw
            else:
                raise MarkerError(f"[mock:{group}]: unknown or malformed item {item!r}")
    return Markers(**values, source=";".join(found))


def message_text(content: Any) -> str:
    """Plain text of an OpenAI or Anthropic message ``content`` (string or list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, Mapping) and "content" in part:
                parts.append(message_text(part["content"]))
        return " ".join(parts)
    return ""


def last_user_text(body: Mapping[str, Any]) -> str:
    """Last user message of a chat request (OpenAI or Anthropic), or embeddings ``input``."""
    for message in reversed(body.get("messages") or []):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return message_text(message.get("content"))
    inp = body.get("input")
    if isinstance(inp, str):
        return inp
    if isinstance(inp, list):
        return " ".join(x for x in inp if isinstance(x, str))
    return ""


def count_tokens(text: str) -> int:
    """Rough token count (≈ chars / 4, at least 1 for non-empty text)."""
    return (len(text) + 3) // 4


def prompt_tokens(body: Mapping[str, Any]) -> int:
    total = count_tokens(message_text(body.get("system", "")))
    for message in body.get("messages") or []:
        if isinstance(message, Mapping):
            total += count_tokens(message_text(message.get("content"))) + 3
    return max(total, 1)


def reply_text(prompt: str, model: str, max_words: int = 24, reply: str | None = None) -> str:
    """Deterministic answer text derived from the prompt (same prompt → same words)."""
    if reply is not None:
        return reply
    digest = hashlib.sha256(f"{model}\x00{prompt}".encode()).digest()
    words = [_WORDS[digest[i % len(digest)] % len(_WORDS)] for i in range(max(max_words - 4, 1))]
    return "Mock reply from " + model + ": " + " ".join(words) + "."


def _max_words(body: Mapping[str, Any], markers: Markers) -> int:
    if markers.tokens is not None:
        return max(markers.tokens, 1)
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and limit > 0:
        return min(limit, 24)
    return 24


def _clip_to_limit(text: str, body: Mapping[str, Any]) -> str:
    """A real model never bills more completion tokens than ``max_tokens``; neither does this."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and limit > 0 and count_tokens(text) > limit:
        return text[: limit * 4]
    return text


@attrs.define
class ScenarioEngine:
    """Decides each request's fate. Holds the seeded rng and the per-id ``times`` counters."""

    settings: Settings = attrs.field(factory=Settings)
    _rng: random.Random = attrs.field(init=False)
    _seen: dict[str, int] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        self._rng = random.Random(self.settings.seed)

    def decide(self, body: Mapping[str, Any]) -> Decision:
        """Raises ``MarkerError`` for a malformed marker (the caller answers 400)."""
        s = self.settings
        model = str(body.get("model") or "mock")
        prompt = last_user_text(body)
        markers = parse_markers(prompt)
        active = markers.only_model is None or markers.only_model == model
        m = markers if active and self._take(markers) else Markers()
        text = _clip_to_limit(reply_text(prompt, model, _max_words(body, m), s.reply), body)
        latency_s = (m.latency_ms if m.latency_ms is not None else s.latency_ms) / 1000.0
        base = Decision(latency_s=latency_s, model=model, prompt_tokens=prompt_tokens(body),
                        stall_s=(m.stall_ms or 0) / 1000.0)
        error = self._error(m)
        if error is None and s.fail_rate > 0 and self._rng.random() < s.fail_rate:
            error = (s.fail_status, _kind_for_status(s.fail_status))
        if error is not None:
            status, kind = error
            return attrs.evolve(base, status=status, error_kind=kind, retry_after=m.retry_after)
        refusal = m.refusal or (s.refusal_rate > 0 and self._rng.random() < s.refusal_rate)
        if refusal:
            text = REFUSAL_TEXT
        completion = count_tokens(text)
        cut = 0 if m.cut_before_first else m.cut_stream
        tps = s.tokens_per_second
        chunks = max(len(text.split(" ")), 1)
        return attrs.evolve(
            base,
            text=text,
            refusal=refusal,
            content_filter=m.content_filter,
            cut_after=cut,
            completion_tokens=completion,
            seconds_per_chunk=(completion / tps / chunks) if tps else 0.0,
        )

    def _error(self, m: Markers) -> tuple[int, str] | None:
        wanted: tuple[int, str] | None = None
        if m.auth:
            wanted = (401, "auth")
        elif m.overloaded:
            wanted = (529, "overloaded")
        elif m.context_length:
            wanted = (400, "context_length")
        elif m.status is not None:
            wanted = (m.status, _kind_for_status(m.status))
        elif m.retry_after is not None:
            wanted = (429, "rate_limit")
        return wanted

    def _take(self, m: Markers) -> bool:
        """``times=N``: the markers apply to the first N requests carrying them, then not."""
        if m.times is None:
            return True
        key = m.id or m.source
        seen = self._seen.get(key, 0)
        self._seen[key] = seen + 1
        if len(self._seen) > 100_000:  # bounded memory for long benchmark runs
            self._seen.clear()
        return seen < m.times


def _kind_for_status(status: int) -> str:
    return {401: "auth", 403: "permission", 404: "not_found", 429: "rate_limit",
            529: "overloaded"}.get(status, "bad_request" if status < 500 else "server")


# -- OpenAI shapes -------------------------------------------------------------------------------

_OPENAI_ERRORS = {
    "auth": ("Incorrect API key provided (mock).", "invalid_request_error", "invalid_api_key"),
    "permission": ("Permission denied (mock).", "permission_error", "permission_denied"),
    "not_found": ("The model does not exist (mock).", "invalid_request_error", "model_not_found"),
    "rate_limit": ("Rate limit reached (mock).", "requests", "rate_limit_exceeded"),
    "context_length": (
        "This model's maximum context length is 8192 tokens. However, your messages resulted in "
        "9000 tokens. Please reduce the length of the messages. (mock)",
        "invalid_request_error",
        "context_length_exceeded",
    ),
    "overloaded": ("Overloaded (mock).", "overloaded_error", "overloaded"),
    "bad_request": ("Bad request (mock).", "invalid_request_error", None),
    "server": ("The server had an error while processing your request (mock).", "server_error",
               None),
}


def error_headers(d: Decision) -> dict[str, str]:
    return {"retry-after": str(d.retry_after)} if d.retry_after is not None else {}


def render_openai_error(d: Decision) -> dict[str, Any]:
    message, etype, code = _OPENAI_ERRORS[d.error_kind or "server"]
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


def openai_error_body(message: str, etype: str = "invalid_request_error",
                      code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


def _finish(d: Decision) -> str:
    return "content_filter" if d.content_filter else "stop"


def _usage(d: Decision) -> dict[str, int]:
    return {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
            "total_tokens": d.prompt_tokens + d.completion_tokens}


def render_openai_completion(d: Decision, request_id: str, created: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": d.text, "refusal": None}
    if d.refusal:
        message = {"role": "assistant", "content": None, "refusal": d.text}
    if d.content_filter:
        message["content"] = ""
    return {
        "id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": created,
        "model": d.model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": _finish(d)}],
        "usage": _usage(d),
    }


def text_pieces(text: str) -> list[str]:
    """Split text into stream deltas (one word each, spaces kept) — joined they equal ``text``."""
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def render_openai_chunks(d: Decision, request_id: str, created: int,
                         include_usage: bool) -> Iterator[dict[str, Any]]:
    """All chunks of a streamed answer (the caller applies ``cut_after``/pacing)."""
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk",
                "created": created, "model": d.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]}

    key = "refusal" if d.refusal else "content"
    yield chunk({"role": "assistant", key: ""})
    if not d.content_filter:
        for piece in text_pieces(d.text):
            yield chunk({key: piece})
    yield chunk({}, _finish(d))
    if include_usage:
        last = chunk({})
        last["choices"] = []
        last["usage"] = _usage(d)
        yield last


def render_embeddings(body: Mapping[str, Any], dims: int = 16) -> dict[str, Any]:
    inp = body.get("input")
    items = [inp] if isinstance(inp, str) else list(inp or [])
    data = []
    total = 0
    for i, item in enumerate(items):
        text = item if isinstance(item, str) else " ".join(map(str, item))
        total += count_tokens(text)
        digest = hashlib.sha256(text.encode()).digest()
        vec = [(digest[j % len(digest)] - 127.5) / 127.5 for j in range(dims)]
        data.append({"object": "embedding", "index": i, "embedding": vec})
    return {"object": "list", "data": data, "model": str(body.get("model") or "mock"),
            "usage": {"prompt_tokens": total, "total_tokens": total}}


# -- Anthropic shapes ----------------------------------------------------------------------------

_ANTHROPIC_ERRORS = {
    "auth": ("authentication_error", "invalid x-api-key (mock)"),
    "permission": ("permission_error", "permission denied (mock)"),
    "not_found": ("not_found_error", "model not found (mock)"),
    "rate_limit": ("rate_limit_error", "Number of requests has exceeded your rate limit (mock)"),
    "context_length": ("invalid_request_error", "prompt is too long: 9000 tokens > 8192 maximum"),
    "overloaded": ("overloaded_error", "Overloaded"),
    "bad_request": ("invalid_request_error", "bad request (mock)"),
    "server": ("api_error", "Internal server error (mock)"),
}


def render_anthropic_error(d: Decision) -> dict[str, Any]:
    etype, message = _ANTHROPIC_ERRORS[d.error_kind or "server"]
    return {"type": "error", "error": {"type": etype, "message": message}}


def _stop_reason(d: Decision) -> str:
    return "refusal" if d.content_filter else "end_turn"


def render_anthropic_message(d: Decision, request_id: str) -> dict[str, Any]:
    content = [] if d.content_filter else [{"type": "text", "text": d.text}]
    return {
        "id": f"msg_{request_id}", "type": "message", "role": "assistant", "model": d.model,
        "content": content, "stop_reason": _stop_reason(d), "stop_sequence": None,
        "usage": {"input_tokens": d.prompt_tokens, "output_tokens": d.completion_tokens},
    }


def render_anthropic_events(d: Decision, request_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs of a streamed Anthropic answer, real event types in real order."""
    message = render_anthropic_message(d, request_id)
    message.update(content=[], stop_reason=None,
                   usage={"input_tokens": d.prompt_tokens, "output_tokens": 1})
    yield "message_start", {"type": "message_start", "message": message}
    yield "ping", {"type": "ping"}
    if not d.content_filter:
        yield "content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}}
        for piece in text_pieces(d.text):
            yield "content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": piece}}
        yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield "message_delta", {"type": "message_delta",
                            "delta": {"stop_reason": _stop_reason(d), "stop_sequence": None},
                            "usage": {"output_tokens": d.completion_tokens}}
    yield "message_stop", {"type": "message_stop"}
