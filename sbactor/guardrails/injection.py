"""Prompt-injection scoring: weighted phrasings combined by noisy-OR.

One strong phrasing ("ignore all previous instructions") flags on its own; weak hints ("system
prompt", "you are now a …") only flag together, so a question *about* system prompts passes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sbactor.guardrails.verdict import Span

_I = re.IGNORECASE

# (pattern, weight, tag, trigger words). A pattern only runs when one of its lower-case trigger
# words occurs in the lower-cased text: a substring test is ~100x cheaper than a regex scan.
BUILTIN: tuple[tuple[str, float, str, tuple[str, ...]], ...] = (
    (
        r"\b(?:ignore|disregard|forget|skip|override)\s+(?:all\s+|any\s+|the\s+|your\s+|of\s+)*"
        r"(?:previous|prior|above|earlier|preceding|former|initial|original)\s+"
        r"(?:instructions?|prompts?|rules|directions|guidelines|context|messages?)",
        0.9,
        "ignore_previous",
        ("ignore", "disregard", "forget", "skip", "override"),
    ),
    (
        r"\byou\s+are\s+now\s+(?:DAN\b|no\s+longer|free\b|unrestricted|unfiltered|jailbroken|"
        r"in\s+(?:developer|god|admin|debug)\s+mode)",
        0.85,
        "role_override",
        ("now",),
    ),
    (r"\byou\s+are\s+now\s+(?:a|an|the|my)\b", 0.4, "role_override", ("now",)),
    (r"\bfrom\s+now\s+on,?\s+you\s+(?:are|will|must)\b", 0.4, "role_override", ("now",)),
    (
        r"\b(?:pretend|act)\s+(?:to\s+be|as\s+if|like|as)\b",
        0.2,
        "role_play",
        ("pretend", "act as", "act like"),
    ),
    (
        r"\b(?:reveal|show|print|repeat|output|leak|tell\s+me|give\s+me)\s+"
        r"(?:me\s+)?(?:your|the)\s+(?:full\s+|original\s+|hidden\s+|initial\s+)?"
        r"(?:system\s+prompt|instructions|initial\s+prompt|hidden\s+prompt)",
        0.75,
        "prompt_leak",
        ("prompt", "instructions"),
    ),
    (r"\bsystem\s+prompt\b", 0.3, "system_prompt", ("system",)),
    (
        r"(?:<\|im_start\|>\s*system|\[/?INST\]|<<SYS>>|^\s*#{2,}\s*system\s*:?)",
        0.7,
        "role_tag",
        ("<|im_start|>", "inst]", "<<sys>>", "system"),
    ),
    (r"\b(?:new|updated|real)\s+instructions\s*:", 0.5, "new_instructions", ("instructions",)),
    (
        r"\b(?:developer|god|jailbreak)\s+mode\b|\bjailbreak\b",
        0.6,
        "jailbreak",
        ("mode", "jailbreak"),
    ),
    (r"\bdo\s+anything\s+now\b", 0.7, "jailbreak", ("anything",)),
    (
        r"\b(?:unfiltered|uncensored|unrestricted)\b",
        0.3,
        "jailbreak",
        ("unfiltered", "uncensored", "unrestricted"),
    ),
    (
        r"\bwithout\s+(?:any\s+)?(?:restrictions|filters|limitations|guidelines|censorship)\b",
        0.35,
        "jailbreak",
        ("without",),
    ),
    (
        r"\b(?:bypass|disable|override|circumvent)\s+(?:your\s+|the\s+|all\s+|any\s+)*"
        r"(?:safety|content\s+polic(?:y|ies)|filters?|guardrails?|restrictions|rules)",
        0.7,
        "bypass",
        ("bypass", "disable", "override", "circumvent"),
    ),
)


Compiled = tuple[re.Pattern[str], float, str, tuple[str, ...]]


def compile_patterns(extra: Sequence[str], extra_weight: float) -> tuple[Compiled, ...]:
    compiled = [(re.compile(p, _I | re.MULTILINE), w, tag, t) for p, w, tag, t in BUILTIN]
    compiled += [(re.compile(p, _I), extra_weight, "custom", ()) for p in extra]
    return tuple(compiled)


def score_injection(text: str, patterns: Sequence[Compiled]) -> tuple[float, list[Span], list[str]]:
    """Noisy-OR of the weights of the phrasings found (each phrasing counts once)."""
    miss = 1.0
    spans: list[Span] = []
    tags: list[str] = []
    lowered = text.lower()
    for pattern, weight, tag, triggers in patterns:
        if triggers and not any(t in lowered for t in triggers):
            continue
        m = pattern.search(text)
        if m is None:
            continue
        miss *= 1.0 - weight
        spans.append(Span(m.start(), m.end(), "PROMPT_INJECTION"))
        if tag not in tags:
            tags.append(tag)
    return 1.0 - miss, spans, tags
