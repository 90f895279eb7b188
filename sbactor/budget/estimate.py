"""Worst-case cost of a request before it runs: estimated input tokens + the output cap.

The estimate is deliberately cheap (no tokenizer): about four characters per token plus a
per-message overhead, which over-estimates typical English slightly — good for a reservation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

TOKENS_PER_MESSAGE = 4
REPLY_PRIMING_TOKENS = 3
IMAGE_TOKENS = 765  # a high-detail 512px tile set; images are rare in budget-critical paths
DEFAULT_OUTPUT_CAP = 4096


def _text_chars(content: Any) -> tuple[int, int]:
    """(characters, image count) of a message content (string or list of parts)."""
    if content is None:
        return 0, 0
    if isinstance(content, str):
        return len(content), 0
    chars = images = 0
    if isinstance(content, Sequence):
        for part in content:
            if isinstance(part, Mapping):
                if part.get("type") == "image_url":
                    images += 1
                else:
                    text = part.get("text")
                    chars += len(text) if isinstance(text, str) else len(str(part))
            else:
                chars += len(str(part))
        return chars, images
    return len(str(content)), 0


def estimate_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Approximate prompt tokens of chat messages: ceil(chars / 4) + overheads."""
    chars = images = 0
    for message in messages:
        c, i = _text_chars(message.get("content"))
        chars += c
        images += i
        name = message.get("name")
        if isinstance(name, str):
            chars += len(name)
        for call in message.get("tool_calls") or ():
            chars += len(str(call))
    return (
        math.ceil(chars / 4)
        + TOKENS_PER_MESSAGE * len(messages)
        + REPLY_PRIMING_TOKENS
        + IMAGE_TOKENS * images
    )


def output_cap(
    max_tokens: int | None,
    model_default: int | None = None,
    context_window: int | None = None,
    input_tokens: int = 0,
) -> int:
    """The most output the request may produce: its own cap, else the model's, else what fits."""
    if max_tokens is not None and max_tokens > 0:
        cap = max_tokens
    elif model_default is not None and model_default > 0:
        cap = model_default
    elif context_window is not None:
        cap = max(context_window - input_tokens, 1)
    else:
        cap = DEFAULT_OUTPUT_CAP
    if context_window is not None:
        cap = min(cap, max(context_window - input_tokens, 1))
    return cap


def worst_case_cost(
    input_tokens: int,
    max_output_tokens: int,
    price_in_per_mtok: float,
    price_out_per_mtok: float,
) -> float:
    """USD if the request uses all of its input estimate and its whole output cap."""
    return (input_tokens * price_in_per_mtok + max_output_tokens * price_out_per_mtok) / 1e6
