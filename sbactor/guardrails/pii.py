"""PII recognisers: regex candidates, then a checksum or parser where one exists.

Candidates are cheap and loose; the checks (Luhn for cards, mod-97 for IBANs, ``ipaddress`` for
IPv6) are what keep order numbers, timestamps and version strings from being called PII.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence

from sbactor.guardrails.verdict import Span

EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
PHONE = re.compile(
    r"(?<![\w+])(?<!\d[\s.-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])"
    r"\d{3,4}[\s.-]\d{3,4}(?![\w-])(?![\s.-]?\d)"
)
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)(?![\w])")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


def _card_ok(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_ok(digits)


def _ipv6_ok(candidate: str) -> bool:
    if candidate.count(":") < 2 or not re.search(r"[0-9A-Fa-f]", candidate):
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _phone_ok(candidate: str) -> bool:
    return 7 <= sum(ch.isdigit() for ch in candidate) <= 15


Check = Callable[[str], bool]

# Where each recogniser can possibly match. Python's ``re`` cannot skip ahead for patterns that
# start with a lookbehind, so running them over a whole 4 KB prompt costs ~0.2 ms each; instead
# cheap, literal- or charset-led scans find candidate windows (digit runs, '@', ':') and the real
# patterns only run there. Lookbehinds still see the text before a window's start.
NUMERIC_RUN = re.compile(r"\d[\d \t().+-]*")
AT = "@"
COLON_PAIR = re.compile(r":[0-9A-Fa-f]{0,4}:")
IBAN_START = re.compile(r"[A-Z]{2}\d{2}")

Window = tuple[int, int]


def _merge_windows(windows: Iterable[Window]) -> list[Window]:
    merged: list[Window] = []
    for start, end in sorted(windows):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _numeric_windows(text: str) -> list[Window]:
    n = len(text)
    return _merge_windows(
        (max(0, m.start() - 4), min(n, m.end() + 2)) for m in NUMERIC_RUN.finditer(text)
    )


def _at_windows(text: str) -> list[Window]:
    n, out, i = len(text), [], text.find(AT)
    while i >= 0:
        out.append((max(0, i - 65), min(n, i + 260)))
        i = text.find(AT, i + 1)
    return _merge_windows(out)


def _colon_windows(text: str) -> list[Window]:
    n = len(text)
    return _merge_windows(
        (max(0, m.start() - 41), min(n, m.end() + 41)) for m in COLON_PAIR.finditer(text)
    )


def _iban_windows(text: str) -> list[Window]:
    n = len(text)
    return _merge_windows(
        (max(0, m.start() - 1), min(n, m.start() + 48)) for m in IBAN_START.finditer(text)
    )


Locator = Callable[[str], list[Window]]

# Priority order: earlier recognisers win overlaps (a card number is not also a phone number).
RECOGNISERS: tuple[tuple[str, tuple[tuple[re.Pattern[str], Check | None, Locator], ...]], ...] = (
    ("EMAIL", ((EMAIL, None, _at_windows),)),
    ("CREDIT_CARD", ((CARD, _card_ok, _numeric_windows),)),
    ("IBAN", ((IBAN, iban_ok, _iban_windows),)),
    ("US_SSN", ((SSN, None, _numeric_windows),)),
    ("IP_ADDRESS", ((IPV4, None, _numeric_windows), (IPV6, _ipv6_ok, _colon_windows))),
    ("PHONE", ((PHONE, _phone_ok, _numeric_windows),)),
)


def find_pii(text: str, entities: Iterable[str]) -> list[Span]:
    """All PII spans of the wanted entity kinds, non-overlapping, in text order."""
    wanted = set(entities)
    taken: list[Span] = []
    windows: dict[Locator, list[Window]] = {}
    for entity, patterns in RECOGNISERS:
        if entity not in wanted:
            continue
        for pattern, check, locate in patterns:
            if locate not in windows:
                windows[locate] = locate(text)
            seen: set[tuple[int, int]] = set()
            for start, end in windows[locate]:
                for m in pattern.finditer(text, start, end):
                    if m.span() in seen or (check is not None and not check(m.group())):
                        continue
                    seen.add(m.span())
                    span = Span(m.start(), m.end(), entity)
                    if not overlaps(span, taken):
                        taken.append(span)
    taken.sort(key=lambda s: s.start)
    return taken


def overlaps(span: Span, others: Sequence[Span]) -> bool:
    return any(span.start < o.end and o.start < span.end for o in others)
