"""The thin async shell of the mesh: cache lookup, cheap detectors, expensive ones under a budget.

Cheap detectors run inline (they are microseconds of regex). Expensive detectors run
concurrently in a nursery inside a cancel scope whose deadline is the latency budget, counted
from the start of the evaluation; whoever is still running then is cancelled and recorded as
``timed_out``. Results with any timeout or error are never cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import trio

from sbactor.actors.runtime import ActorClosed, ActorError
from sbactor.actors.verdict_cache import Get, Put, VerdictCache, cache_key
from sbactor.guardrails.compiled import CompiledGuardrails, scan_text
from sbactor.guardrails.config import MeshConfig
from sbactor.guardrails.detectors import AsyncDetector, CheapDetector
from sbactor.guardrails.fusion import (
    GuardrailResult,
    Mode,
    decide,
    flag_count,
    fused_labels,
)
from sbactor.guardrails.verdict import Verdict, failed, timed_out

if TYPE_CHECKING:
    import httpx2

# Simple mode has no mesh block; it fails open and never blocks on a quorum, only on a hit.
_SIMPLE = MeshConfig(block_threshold=1, redact_on_flag=False, cache=False)


def build_result(
    verdicts: Sequence[Verdict], mesh: MeshConfig, *, mode: Mode, elapsed_ms: float = 0.0
) -> GuardrailResult:
    """Pure: fuse verdicts into the result (the decision itself is ``fusion.decide``)."""
    flags = flag_count(verdicts, mesh)
    return GuardrailResult(
        action=decide(flags, mesh),
        flagged_count=flags,
        labels=fused_labels(verdicts, mesh.on_detector_error),
        verdicts=tuple(verdicts),
        timed_out=tuple(v.detector for v in verdicts if v.status == "timed_out"),
        cached=False,
        mode=mode,
        elapsed_ms=elapsed_ms,
    )


def run_cheap(detector: CheapDetector, text: str) -> Verdict:
    """A detector bug becomes an ``error`` verdict, not a 500."""
    try:
        return detector.check(text)
    except Exception as exc:
        return failed(detector.name, detector.kind, f"{type(exc).__name__}: {exc}")


async def _run_expensive(
    detector: AsyncDetector,
    text: str,
    http: httpx2.AsyncClient | None,
    results: dict[str, Verdict],
) -> None:
    try:
        results[detector.name] = await detector.check_async(text, http)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        results[detector.name] = failed(detector.name, detector.kind, error)


async def evaluate(
    texts: Sequence[str],
    guardrails: CompiledGuardrails,
    *,
    cache: VerdictCache | None,
    http: httpx2.AsyncClient | None,
    cache_timeout: float = 1.0,
) -> GuardrailResult:
    """Run the input guardrails over the message texts and decide pass / redact / block."""
    started = trio.current_time()
    if not guardrails.detectors:
        return build_result(
            (), guardrails.mesh or _SIMPLE, mode="mesh" if guardrails.mesh else "simple"
        )
    text = scan_text(texts)
    if guardrails.mesh is None:
        return await _evaluate_simple(text, guardrails, http, started)
    mesh = guardrails.mesh

    key = None
    if cache is not None and mesh.cache:
        key = cache_key(texts, guardrails.fingerprint)
        hit = await _cache_get(cache, key, cache_timeout)
        if hit is not None:
            return attrs.evolve(hit, cached=True, elapsed_ms=_ms_since(started))

    verdicts: dict[str, Verdict] = {d.name: run_cheap(d, text) for d in guardrails.cheap}
    expensive = guardrails.expensive
    if expensive:
        results: dict[str, Verdict] = {}
        with trio.move_on_at(started + mesh.latency_budget_ms / 1000):
            async with trio.open_nursery() as nursery:
                for detector in expensive:
                    nursery.start_soon(_run_expensive, detector, text, http, results)
        for detector in expensive:
            verdicts[detector.name] = results.get(detector.name) or timed_out(
                detector.name, detector.kind, mesh.latency_budget_ms
            )

    ordered = [verdicts[d.name] for d in guardrails.detectors]
    result = build_result(ordered, mesh, mode="mesh", elapsed_ms=_ms_since(started))
    if key is not None and cache is not None and result.complete:
        try:
            cache.cast_nowait(Put(key, result))
        except (trio.WouldBlock, ActorClosed):
            pass  # a busy or stopped cache costs a future miss, never this request
    return result


async def _evaluate_simple(
    text: str, guardrails: CompiledGuardrails, http: httpx2.AsyncClient | None, started: float
) -> GuardrailResult:
    """No mesh block: serial, in config order, block on the first hit, fail open."""
    verdicts: list[Verdict] = []
    for detector in guardrails.detectors:
        if isinstance(detector, CheapDetector):
            verdict = run_cheap(detector, text)
        else:
            results: dict[str, Verdict] = {}
            await _run_expensive(detector, text, http, results)
            verdict = results[detector.name]
        verdicts.append(verdict)
        if verdict.status == "ok" and verdict.flagged:
            break
    return build_result(verdicts, _SIMPLE, mode="simple", elapsed_ms=_ms_since(started))


async def _cache_get(cache: VerdictCache, key: str, wait_s: float) -> GuardrailResult | None:
    # The local LRU is read directly: a sync read of the actor's dict is safe in trio's single
    # thread and saves a round trip per request (writes still go through the mailbox). Only a
    # remote tier (Redis) needs the actor.
    hit = cache.get(key)
    if hit is not None or not cache.remote_tier:
        return hit
    try:
        hit = await cache.call(Get(key), timeout=wait_s)
    except (ActorClosed, ActorError, trio.TooSlowError):
        return None  # the cache is an optimisation: any trouble is a miss
    return hit if isinstance(hit, GuardrailResult) else None


def _ms_since(started: float) -> float:
    return (trio.current_time() - started) * 1000
