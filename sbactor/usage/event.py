"""The usage event: one immutable record per request, served or refused.

Every sink (the JSONL file, the signed ledger, the feedback loop, the budget reconcile) reads the
same event, so what the ledger proves is exactly what the gateway billed and learned from.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import attrs

from sbactor.ledger.chain import rfc3339

EventKind = Literal["completion", "refusal", "error", "feedback"]


def utc_now_rfc3339() -> str:
    return rfc3339(time.time())


@attrs.frozen
class UsageEvent:
    request_id: str
    dedup_key: str  # unique per request (the ledger drops a re-sent event with the same key)
    kind: EventKind
    time: str
    principal: dict[str, Any]
    surface: str
    requested_model: str
    status: int
    routed_model: str | None = None
    provider: str | None = None
    deployment: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    usage_estimated: bool = False
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    upstream_latency_ms: float = 0.0
    overhead_ms: float = 0.0
    stream: bool = False
    finish_reason: str | None = None
    attempts: tuple[dict[str, Any], ...] = ()
    tags: tuple[str, ...] = ()
    sink_tag: str | None = None
    refusal: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    guardrails: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
    policy: dict[str, Any] | None = None
    client_disconnected: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, ``None`` fields left out. (Flat on purpose: the values are already plain
        data, and ``attrs.asdict``'s recursion showed up in the hot path.)"""
        data = {name: getattr(self, name) for name in _FIELD_NAMES}
        data["attempts"] = list(self.attempts)
        data["tags"] = list(self.tags)
        return {k: v for k, v in data.items() if v is not None}


_FIELD_NAMES = tuple(f.name for f in attrs.fields(UsageEvent))
