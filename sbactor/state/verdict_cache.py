"""SharedVerdictCache: the guardrail VerdictCache with a second tier in Redis.

On with ``state.shared_verdict_cache: true`` (``state.backend: redis``). A lookup tries the
local LRU first; on a local miss it reads ``P vc:<key>`` from Redis (the same config-aware key:
sha256 over the guardrail config fingerprint and the normalized texts) and keeps a hit in the
local LRU. A put stores locally and in Redis with ``state.verdict_cache_ttl_s``. Only complete
results are ever put (the mesh enforces it), so a verdict computed on one instance is reused by
every other one running the same guardrail config, and never by one running another config.

Redis unavailable: the local LRU alone (a shared miss is just a miss; the request never waits
longer than ``state.timeout_s`` for it).
"""

from __future__ import annotations

from typing import Any

import attrs
import cattrs
import orjson

from sbactor.actors.verdict_cache import Get, Put, VerdictCache
from sbactor.guardrails.fusion import GuardrailResult
from sbactor.state.client import StateClient, StateUnavailable

_CONVERTER = cattrs.Converter()


def dump_result(result: GuardrailResult) -> bytes:
    """Pure: a cacheable result as JSON (``cached``/``elapsed_ms`` are per-lookup, reset)."""
    data = _CONVERTER.unstructure(attrs.evolve(result, cached=False, elapsed_ms=0.0))
    return orjson.dumps(data)


def load_result(data: str | bytes) -> GuardrailResult:
    return _CONVERTER.structure(orjson.loads(data), GuardrailResult)


@attrs.define(eq=False)
class SharedVerdictCache(VerdictCache):
    remote_tier = True
    state: StateClient | None = None
    ttl_s: int = 3600

    _shared_hits: int = attrs.field(init=False, default=0)
    _shared_misses: int = attrs.field(init=False, default=0)
    _shared_puts: int = attrs.field(init=False, default=0)
    _shared_errors: int = attrs.field(init=False, default=0)

    def _key(self, key: str) -> str:
        assert self.state is not None
        return f"{self.state.prefix}vc:{key}"

    async def handle(self, message: Any) -> Any:
        if isinstance(message, Get):  # the local tier was already read (mesh._cache_get)
            if self.state is None or not self.state.up:
                return None
            return await self._shared_get(message.key)
        if isinstance(message, Put):
            self.put(message.key, message.result)
            if self.state is not None and self.state.up:
                try:
                    await self.state.command("SET", self._key(message.key),
                                             dump_result(message.result), "EX", self.ttl_s)
                    self._shared_puts += 1
                except StateUnavailable:
                    self._shared_errors += 1
            return None
        return await super().handle(message)

    async def _shared_get(self, key: str) -> GuardrailResult | None:
        assert self.state is not None
        try:
            raw = await self.state.command("GET", self._key(key))
        except StateUnavailable:
            self._shared_errors += 1
            return None
        if raw is None:
            self._shared_misses += 1
            return None
        try:
            result = load_result(raw)
        except Exception:  # written by another version: treat as a miss, it gets overwritten
            self._shared_errors += 1
            return None
        self._shared_hits += 1
        # the local tier counted a miss; the shared tier turned it into a hit
        self._misses -= 1
        self._hits += 1
        self.put(key, result)
        self._puts -= 1  # a copy from the shared tier, not a new verdict
        return result

    def state_summary(self) -> dict[str, Any]:
        out = super().state_summary()
        out.update({
            "shared": True,
            "shared_hits": self._shared_hits,
            "shared_misses": self._shared_misses,
            "shared_puts": self._shared_puts,
            "shared_errors": self._shared_errors,
        })
        return out
