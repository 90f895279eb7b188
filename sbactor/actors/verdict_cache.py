"""VerdictCache: the actor that owns the LRU of fused guardrail results.

Keys are SHA-256 over the normalized message texts *and* the guardrail config fingerprint, so a
config change can never serve a verdict computed under another config. Only complete results
(no detector timed out or failed) are ever put here; the mesh enforces that.

Memory per entry is kept small: the key is held as its 32 raw bytes (not 64 hex characters),
and equal results are stored once (most prompts get the same few verdicts), each with a count of
the entries that hold it, so an entry costs ~150 bytes instead of ~700.
"""

from __future__ import annotations

import hashlib
import math
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


def _compact(key: str) -> bytes | str:
    """A ``cache_key`` (64 lowercase hex digits) as its 32 bytes; any other key as it is (a str
    never equals bytes, so the two forms cannot collide)."""
    if len(key) == 64:
        try:
            raw = bytes.fromhex(key)
        except ValueError:
            return key
        if raw.hex() == key:
            return raw
    return key


def _shareable(result: GuardrailResult) -> bool:
    """Equal results may be stored once, unless a -0.0 score would then print as 0.0."""
    return all(v.score != 0.0 or math.copysign(1.0, v.score) > 0 for v in result.verdicts)


class _Shared:
    __slots__ = ("refs", "result")

    def __init__(self, result: GuardrailResult) -> None:
        self.result = result
        self.refs = 0


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

    _entries: OrderedDict[bytes | str, GuardrailResult] = attrs.field(
        init=False, factory=OrderedDict
    )
    # one stored copy per distinct result, with how many entries hold it
    _shared: dict[GuardrailResult, _Shared] = attrs.field(init=False, factory=dict)
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
            self.clear()
            return dropped
        raise TypeError(f"VerdictCache cannot handle {type(message).__name__}")

    #: a second tier behind the local LRU (Redis): a local miss must then ask the actor
    remote_tier = False

    # The sync core, used by the handler (and directly by tests and benchmarks).

    def get(self, key: str) -> GuardrailResult | None:
        compact = _compact(key)
        result = self._entries.get(compact)
        if result is None:
            self._misses += 1
            return None
        self._entries.move_to_end(compact)
        self._hits += 1
        return result

    def put(self, key: str, result: GuardrailResult) -> None:
        """Store ``result`` as most recent. ``cached`` and ``elapsed_ms`` describe one lookup,
        not the verdict (a hit sets both anew), so they are stored as ``False`` and 0."""
        self._puts += 1
        compact = _compact(key)
        if result.cached or result.elapsed_ms != 0.0:
            result = attrs.evolve(result, cached=False, elapsed_ms=0.0)
        if _shareable(result):
            shared = self._shared.get(result)
            if shared is None:
                shared = self._shared[result] = _Shared(result)
            shared.refs += 1
            result = shared.result
        old = self._entries.pop(compact, None)
        if old is not None:
            self._release(old)
        self._entries[compact] = result
        while len(self._entries) > self.max_entries:
            _, evicted = self._entries.popitem(last=False)
            self._release(evicted)
            self._evictions += 1

    def _release(self, result: GuardrailResult) -> None:
        shared = self._shared.get(result)
        if shared is not None and shared.result is result:
            shared.refs -= 1
            if shared.refs == 0:
                del self._shared[result]

    def clear(self) -> None:
        self._entries.clear()
        self._shared.clear()

    async def on_restart(self) -> None:
        self.clear()

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
