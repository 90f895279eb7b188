"""Redaction: mask PII and secret spans in the request before it reaches any upstream.

Spans are recomputed per message text from the redacting detectors, so redaction works whether
the mesh decided ``redact`` or the policy plane asked for it on a request the mesh passed, and
whether the mesh result came from the cache or not. Inputs are never mutated.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sbactor.guardrails.compiled import CompiledGuardrails, normalize
from sbactor.guardrails.fusion import GuardrailResult
from sbactor.guardrails.verdict import Span


def placeholder(entity: str) -> str:
    return f"[REDACTED:{entity}]"


def merge_spans(spans: Iterable[Span]) -> list[Span]:
    """Non-overlapping spans in text order; on overlap the earlier, then longer, span wins."""
    out: list[Span] = []
    for span in sorted(spans, key=lambda s: (s.start, -(s.end - s.start))):
        if out and span.start < out[-1].end:
            continue
        out.append(span)
    return out


def apply_spans(text: str, spans: Sequence[Span]) -> str:
    parts: list[str] = []
    pos = 0
    for span in merge_spans(spans):
        parts.append(text[pos : span.start])
        parts.append(placeholder(span.entity))
        pos = span.end
    parts.append(text[pos:])
    return "".join(parts)


def redaction_spans(text: str, guardrails: CompiledGuardrails) -> list[Span]:
    """Every maskable span in ``text`` (PII, secrets, and patterns configured with ``redact``)."""
    spans: list[Span] = []
    for detector in guardrails.redacting:
        spans.extend(detector.redaction_spans(text))
    return merge_spans(spans)


def redact_text(text: str, guardrails: CompiledGuardrails) -> str:
    text = normalize(text)
    return apply_spans(text, redaction_spans(text, guardrails))


def redact_texts(texts: Sequence[str], guardrails: CompiledGuardrails) -> list[str]:
    return [redact_text(t, guardrails) for t in texts]


def redact_messages(
    messages: Sequence[dict[str, Any]],
    result: GuardrailResult | None,
    guardrails: CompiledGuardrails,
) -> list[dict[str, Any]]:
    """New message dicts with every text content redacted (string or ``{"type": "text"}`` parts).

    Spans are always recomputed per text (``result`` may be ``None``, a cached result, or a
    ``pass`` the policy plane overrode): the mesh may have scanned only some roles, and a cached
    result carries no positions for *this* request's texts.
    """
    del result  # accepted for symmetry with the mesh decision; see the docstring
    if not guardrails.redacting:
        return [dict(m) for m in messages]
    out: list[dict[str, Any]] = []
    for message in messages:
        copy = dict(message)
        content = message.get("content")
        if isinstance(content, str):
            copy["content"] = redact_text(content, guardrails)
        elif isinstance(content, list):
            copy["content"] = [_redact_part(part, guardrails) for part in content]
        out.append(copy)
    return out


def _redact_part(part: Any, guardrails: CompiledGuardrails) -> Any:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return {**part, "text": redact_text(part["text"], guardrails)}
    return dict(part) if isinstance(part, dict) else part


def message_texts(
    messages: Sequence[dict[str, Any]], roles: Iterable[str] | None = None
) -> list[str]:
    """The text contents the guardrails scan (optionally only some roles), in message order."""
    wanted = set(roles) if roles is not None else None
    texts: list[str] = []
    for message in messages:
        if wanted is not None and message.get("role") not in wanted:
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    text = part.get("text")
                    if isinstance(text, str):
                        texts.append(text)
    return texts
