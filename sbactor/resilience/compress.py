"""Context compress-and-retry: drop the oldest non-system turns until the prompt fits.

Used when a model's context window overflowed and no larger model is configured. System (and
developer) messages and the last user turn with everything after it are always kept; a tool
answer is never left without the assistant turn that called it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["compress_messages", "estimate_tokens", "overflow_numbers"]

Message = Mapping[str, Any]
_PINNED_ROLES = {"system", "developer"}


def _text_len(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(_text_len(part.get("text", "")) if isinstance(part, Mapping) else 0
                   for part in content)
    return 0


def estimate_tokens(messages: Sequence[Message]) -> int:
    """A cheap prompt-size estimate: ~4 characters per token plus a few tokens per message."""
    chars = 0
    for m in messages:
        chars += _text_len(m.get("content"))
        for call in m.get("tool_calls") or ():
            if isinstance(call, Mapping):
                fn = call.get("function")
                chars += len(str(fn.get("arguments", ""))) if isinstance(fn, Mapping) else 0
    return chars // 4 + 4 * len(messages) + 3


def compress_messages(
    messages: Sequence[Message],
    context_window: int,
    estimate: Callable[[Sequence[Message]], int] = estimate_tokens,
    *,
    min_drop: int = 0,
) -> list[dict[str, Any]] | None:
    """Drop the oldest turns until ``estimate(result) <= context_window`` and at least
    ``min_drop`` messages went. None when even the kept messages do not fit."""
    items = [dict(m) for m in messages]
    last_user = max((i for i, m in enumerate(items) if m.get("role") == "user"), default=None)
    if last_user is None:
        return None
    turns = _turns(items, last_user)
    dropped: set[int] = set()

    def kept() -> list[dict[str, Any]]:
        return [m for i, m in enumerate(items) if i not in dropped]

    while turns and (len(dropped) < min_drop or estimate(kept()) > context_window):
        dropped.update(turns.pop(0))
    result = kept()
    if len(dropped) < min_drop or estimate(result) > context_window:
        return None
    return result


def _turns(items: Sequence[Message], last_user: int) -> list[list[int]]:
    """Droppable turns before the last user message: a user message and what answers it (assistant
    turns, tool calls and results) go together, so no tool result loses its call."""
    turns: list[list[int]] = []
    for i in range(last_user):
        role = items[i].get("role")
        if role in _PINNED_ROLES:
            continue
        if role == "user" or not turns:
            turns.append([i])
        else:
            turns[-1].append(i)
    return turns


_OPENAI_NUMBERS = re.compile(
    r"maximum context length is (\d+) tokens.*?(?:resulted in|requested) (\d+) tokens", re.I | re.S
)
_ANTHROPIC_NUMBERS = re.compile(r"prompt is too long:\s*(\d+) tokens\s*>\s*(\d+)", re.I)


def overflow_numbers(message: str) -> tuple[int, int] | None:
    """(tokens sent, limit) when the upstream's message states them, else None."""
    m = _OPENAI_NUMBERS.search(message)
    if m:
        return int(m.group(2)), int(m.group(1))
    m = _ANTHROPIC_NUMBERS.search(message)
    if m:
        return int(m.group(1)), int(m.group(2))
    return None
