"""VerdictCache: the actor that owns the LRU of fused guardrail results.

Keys are SHA-256 over the normalized message texts *and* the guardrail config fingerprint, so a
config change can never serve a verdict computed under another config. Only complete results
(no detector timed out or failed) are ever put here; the mesh enforces that.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import attrs

from sbactor.actors.runtime import Actor
from sbactor.guardrails.compiled import normalize
from sbactor.guardrails.fusion import GuardrailResult


def cache_key(texts: Sequence[str], fingerprint: str) -> str:
    """Pure: sha256(fingerprint, then each normalized text length-prefixed)."""
    h = hashlib.sha256()
    h.update(fingerprint.encode())
    h.update(len(texts).to_bytes(4, "big"))
    for text in texts:
        data = normalize(text).encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


@attrs.frozen
class Get:
    """``call``: answers the cached ``GuardrailResult`` or ``None``."""

    key: str


@attrs.frozen
class Put:
    """``cast``: store a result (evicting the least recently used entry when full)."""

    key: str
    result: GuardrailResult


@attrs.frozen
class Clear:
    """``call``: drop every entry (e.g. after a config reload); answers how many were dropped."""


@attrs.define(eq=False)
class VerdictCache(Actor):
    max_entries: int = 10000

    _entries: OrderedDict[str, GuardrailResult] = attrs.field(init=False, factory=OrderedDict)
    _hits: int = attrs.field(init=False, default=0)
    _misses: int = attrs.field(init=False, default=0)
    _evictions: int = attrs.field(init=False, default=0)
    _puts: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError(f"actor {self.name}: cache capacity must be >= 1")
        super().__attrs_post_init__()

    async def handle(self, message: Any) -> Any:
        if isinstance(message, Get):
            return self.get(message.key)
        if isinstance(message, Put):
            self.put(message.key, message.result)
            return None
        if isinstance(message, Clear):
            dropped = len(self._entries)
            self._entries.clear()
            return dropped
        raise TypeError(f"VerdictCache cannot handle {type(message).__name__}")

    #: a second tier behind the local LRU (Redis): a local miss must then ask the actor
    remote_tier = False

    # The sync core, used by the handler (and directly by tests and benchmarks).

    def get(self, key: str) -> GuardrailResult | None:
        result = self._entries.get(key)
        if result is None:
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return result

    def put(self, key: str, result: GuardrailResult) -> None:
        self._puts += 1
        self._entries[key] = result
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self._evictions += 1

    async def on_restart(self) -> None:
        self._entries.clear()

    def state_summary(self) -> dict[str, Any]:
        lookups = self._hits + self._misses
        return {
            "size": len(self._entries),
            "capacity": self.max_entries,
            "hits": self._hits,
            "misses": self._misses,
            "evictions": self._evictions,
            "puts": self._puts,
            "hit_ratio": round(self._hits / lookups, 4) if lookups else 0.0,
        }
