"""Detectors compiled from config: pure ``text -> Verdict`` objects, regexes built once.

Cheap detectors are sync and run inline; the expensive kind (``http``) is async and is run by the
mesh under its latency budget. Detectors that find maskable content also answer
``redaction_spans`` so redaction can be computed on demand, independent of the mesh decision.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import attrs

from sbactor.guardrails import injection
from sbactor.guardrails.config import (
    DenylistConfig,
    DetectorConfig,
    HttpDetectorConfig,
    LengthConfig,
    PiiConfig,
    PromptInjectionConfig,
    RegexConfig,
    SecretsConfig,
    detector_name,
)
from sbactor.guardrails.pii import find_pii
from sbactor.guardrails.secrets import find_secrets
from sbactor.guardrails.verdict import Span, Verdict, ok

if TYPE_CHECKING:
    import httpx2


@attrs.frozen
class CheapDetector:
    """Base of the sync detectors."""

    name: str
    cost: Literal["cheap", "expensive"] = attrs.field(default="cheap", init=False)

    @property
    def kind(self) -> str:
        raise NotImplementedError

    def check(self, text: str) -> Verdict:
        raise NotImplementedError

    def redaction_spans(self, text: str) -> list[Span]:
        return []

    @property
    def redacts(self) -> bool:
        return False


@attrs.frozen
class SpanDetector(CheapDetector):
    """Flags when it finds any span, and masks those spans when its config says ``redact``."""

    def _find(self, text: str) -> list[Span]:
        raise NotImplementedError

    @property
    def label(self) -> str:
        return self.kind

    @property
    def redacts(self) -> bool:
        return bool(getattr(self, "cfg").redact)  # noqa: B009 - every subclass has a cfg

    def check(self, text: str) -> Verdict:
        spans = self._find(text)
        return ok(
            self.name,
            self.kind,
            flagged=bool(spans),
            score=1.0 if spans else 0.0,
            labels=(self.label,),
            spans=tuple(spans),
        )

    def redaction_spans(self, text: str) -> list[Span]:
        return self._find(text) if self.redacts else []


@attrs.frozen
class PiiDetector(SpanDetector):
    cfg: PiiConfig = attrs.field(kw_only=True)
    kind = "pii"

    def _find(self, text: str) -> list[Span]:
        return find_pii(text, self.cfg.entities)


@attrs.frozen
class SecretsDetector(SpanDetector):
    cfg: SecretsConfig = attrs.field(kw_only=True)
    kind = "secrets"

    def _find(self, text: str) -> list[Span]:
        return find_secrets(
            text,
            self.cfg.kinds,
            entropy_threshold=self.cfg.entropy_threshold,
            entropy_min_length=self.cfg.entropy_min_length,
        )



@attrs.frozen
class InjectionDetector(CheapDetector):
    cfg: PromptInjectionConfig = attrs.field(kw_only=True)
    patterns: tuple[injection.Compiled, ...] = attrs.field(kw_only=True)
    kind = "prompt_injection"

    def check(self, text: str) -> Verdict:
        score, spans, _tags = injection.score_injection(text, self.patterns)
        flagged = score >= self.cfg.threshold and score > 0
        return ok(
            self.name,
            self.kind,
            flagged=flagged,
            score=score,
            labels=("prompt_injection",),
            spans=tuple(spans),
        )


@attrs.frozen
class DenylistDetector(SpanDetector):
    cfg: DenylistConfig = attrs.field(kw_only=True)
    pattern: re.Pattern[str] | None = attrs.field(kw_only=True)
    kind = "denylist"

    def _find(self, text: str) -> list[Span]:
        if self.pattern is None:
            return []
        entity = self.cfg.label.upper()
        return [Span(m.start(), m.end(), entity) for m in self.pattern.finditer(text)]

    @property
    def label(self) -> str:
        return self.cfg.label


@attrs.frozen
class RegexDetector(CheapDetector):
    cfg: RegexConfig = attrs.field(kw_only=True)
    compiled: tuple[tuple[re.Pattern[str], str, bool], ...] = attrs.field(kw_only=True)
    kind = "regex"

    def _find(self, text: str, *, only_redacting: bool) -> tuple[list[Span], list[str]]:
        spans: list[Span] = []
        labels: list[str] = []
        for pattern, label, redact in self.compiled:
            if only_redacting and not redact:
                continue
            for m in pattern.finditer(text):
                if m.end() > m.start():
                    spans.append(Span(m.start(), m.end(), label.upper()))
                    if label not in labels:
                        labels.append(label)
        return spans, labels

    def check(self, text: str) -> Verdict:
        spans, labels = self._find(text, only_redacting=False)
        return ok(
            self.name,
            self.kind,
            flagged=bool(spans),
            score=1.0 if spans else 0.0,
            labels=tuple(labels),
            spans=tuple(spans),
        )

    def redaction_spans(self, text: str) -> list[Span]:
        return self._find(text, only_redacting=True)[0]

    @property
    def redacts(self) -> bool:
        return any(redact for _, _, redact in self.compiled)


@attrs.frozen
class LengthDetector(CheapDetector):
    cfg: LengthConfig = attrs.field(kw_only=True)
    kind = "length"

    def check(self, text: str) -> Verdict:
        tokens = estimate_tokens(text, self.cfg.chars_per_token)
        flagged = tokens > self.cfg.max_tokens
        return ok(
            self.name,
            self.kind,
            flagged=flagged,
            score=min(1.0, tokens / self.cfg.max_tokens),
            labels=("length",),
        )


def estimate_tokens(text: str, chars_per_token: float) -> int:
    return math.ceil(len(text) / chars_per_token)


@attrs.frozen
class HttpDetector:
    """The expensive kind: POST the text to a moderation-style classifier."""

    name: str
    cfg: HttpDetectorConfig
    cost: Literal["cheap", "expensive"] = attrs.field(default="expensive", init=False)
    kind = "http"

    async def check_async(self, text: str, http: httpx2.AsyncClient | None) -> Verdict:
        from sbactor.guardrails.http_detector import classify

        return await classify(self.name, self.cfg, text, http)

    @property
    def redacts(self) -> bool:
        return False

    def redaction_spans(self, text: str) -> list[Span]:
        return []


class AsyncDetector(Protocol):
    """What the mesh needs from an expensive detector (``HttpDetector``, or a test fake)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def cost(self) -> Literal["cheap", "expensive"]: ...
    @property
    def redacts(self) -> bool: ...

    def redaction_spans(self, text: str) -> list[Span]: ...

    async def check_async(self, text: str, http: httpx2.AsyncClient | None) -> Verdict: ...


Detector = CheapDetector | AsyncDetector


def build_detector(cfg: DetectorConfig) -> Detector:
    """Compile one detector config (regexes are built here, once)."""
    name = detector_name(cfg)
    if isinstance(cfg, PiiConfig):
        return PiiDetector(name, cfg=cfg)
    if isinstance(cfg, SecretsConfig):
        return SecretsDetector(name, cfg=cfg)
    if isinstance(cfg, PromptInjectionConfig):
        patterns = injection.compile_patterns(cfg.extra_patterns, cfg.extra_weight)
        return InjectionDetector(name, cfg=cfg, patterns=patterns)
    if isinstance(cfg, DenylistConfig):
        return DenylistDetector(name, cfg=cfg, pattern=_denylist_pattern(cfg))
    if isinstance(cfg, RegexConfig):
        flags = 0 if cfg.case_sensitive else re.IGNORECASE
        compiled = tuple((re.compile(p.pattern, flags), p.label, p.redact) for p in cfg.patterns)
        return RegexDetector(name, cfg=cfg, compiled=compiled)
    if isinstance(cfg, LengthConfig):
        return LengthDetector(name, cfg=cfg)
    if isinstance(cfg, HttpDetectorConfig):
        return HttpDetector(name, cfg)
    raise ValueError(f"unknown detector config {cfg!r}")


def _denylist_pattern(cfg: DenylistConfig) -> re.Pattern[str] | None:
    words = sorted({w.strip() for w in cfg.words}, key=len, reverse=True)
    if not words:
        return None
    body = "|".join(re.escape(w) for w in words)
    flags = 0 if cfg.case_sensitive else re.IGNORECASE
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)", flags)


def describe(detectors: Sequence[Detector]) -> list[dict[str, Any]]:
    """A summary for /admin and docs: name, kind, cost class."""
    return [{"name": d.name, "kind": d.kind, "cost": d.cost} for d in detectors]
