"""Secret recognisers: known token formats first, then high-entropy strings as a catch-all.

Known prefixes are precise; the entropy check is the net for keys we do not know, tuned so that
ordinary long words, paths and hex digests stay below it (they use too few symbols).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

from sbactor.guardrails.pii import overlaps
from sbactor.guardrails.verdict import Span

# Each pattern starts with a literal so ``re`` can jump between candidates; the "not preceded
# by a word character" checks are lookbehinds placed *after* the prefix for the same reason.
KNOWN: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "PRIVATE_KEY",
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
            r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|[A-Za-z0-9+/=\s]*)"
        ),
    ),
    (
        "API_KEY",
        re.compile(r"sk-(?<![\w-]sk-)(?:proj-|ant-(?:api\d\d-)?|svcacct-)?[A-Za-z0-9_-]{20,}"),
    ),
    ("API_KEY", re.compile(r"k_(?<=[srp]k_)(?<![\w-][srp]k_)(?:live|test)_[A-Za-z0-9]{16,}")),
    ("API_KEY", re.compile(r"AIza(?<![\w-]AIza)[0-9A-Za-z_-]{35}(?![\w-])")),
    (
        "AWS_ACCESS_KEY",
        re.compile(r"A[KS]IA(?<![A-Za-z0-9]A[KS]IA)[0-9A-Z]{16}(?![A-Za-z0-9])"),
    ),
    ("GITHUB_TOKEN", re.compile(r"gh[pousr]_(?<!\wgh[pousr]_)[A-Za-z0-9]{36,255}(?!\w)")),
    ("GITHUB_TOKEN", re.compile(r"github_pat_(?<!\wgithub_pat_)[A-Za-z0-9_]{22,255}(?!\w)")),
    ("SLACK_TOKEN", re.compile(r"xox[abposr]-(?<![\w-]xox[abposr]-)[A-Za-z0-9-]{10,250}")),
)

TOKEN = re.compile(r"[A-Za-z0-9+/_=-]{16,}")


def shannon_entropy(token: str) -> float:
    """Bits per character of the token's own symbol distribution."""
    n = len(token)
    return -sum(c / n * math.log2(c / n) for c in Counter(token).values())


def _char_classes(token: str) -> int:
    return (
        any(c.islower() for c in token)
        + any(c.isupper() for c in token)
        + any(c.isdigit() for c in token)
    )


def find_secrets(
    text: str, kinds: Iterable[str], *, entropy_threshold: float, entropy_min_length: int
) -> list[Span]:
    wanted = set(kinds)
    taken: list[Span] = []
    for kind, pattern in KNOWN:
        if kind not in wanted:
            continue
        for m in pattern.finditer(text):
            span = Span(m.start(), m.end(), kind)
            if not overlaps(span, taken):
                taken.append(span)
    if "HIGH_ENTROPY" in wanted:
        for m in TOKEN.finditer(text):
            token = m.group()
            if len(token) < entropy_min_length or _char_classes(token) < 3:
                continue
            if shannon_entropy(token) < entropy_threshold:
                continue
            span = Span(m.start(), m.end(), "HIGH_ENTROPY")
            if not overlaps(span, taken):
                taken.append(span)
    taken.sort(key=lambda s: s.start)
    return taken
