"""Guardrail mesh cost per request for a ~4 KB prompt: cold (every detector runs), cached
(VerdictCache hit through the actor's mailbox), per detector, and redaction.

    /work/venv/bin/python benchmarks/bench_guardrails.py [--iterations N]

Bounded: a few thousand evaluations, a few seconds. Progress on stderr, the table on stdout.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import trio
import trio.testing

from sbactor.actors.verdict_cache import VerdictCache
from sbactor.guardrails import (
    CompiledGuardrails,
    GuardrailsConfig,
    LengthConfig,
    MeshConfig,
    PiiConfig,
    PromptInjectionConfig,
    SecretsConfig,
    redact_messages,
)
from sbactor.guardrails.compiled import scan_text
from sbactor.guardrails.detectors import CheapDetector
from sbactor.guardrails.mesh import evaluate

PARAGRAPH = (
    "Our quarterly review covers the migration of the billing service, the new onboarding flow "
    "and the incident from last Tuesday. Please summarise the open risks, list the owners and "
    "suggest two follow-up actions for each team. Keep the tone neutral and concise. "
)


def prompt_4kb(with_pii: bool) -> str:
    text = ""
    while len(text) < 4096:
        text += PARAGRAPH
    text = text[:4096]
    if with_pii:
        text = "Contact jane.roe@example.com or 555-123-4567. " + text[:-48]
    return text


def progress(label: str, i: int, n: int) -> None:
    if i % max(1, n // 20) == 0 or i == n:
        print(f"\r{label:<34} {i:>6}/{n}", end="", file=sys.stderr, flush=True)
    if i == n:
        print(file=sys.stderr)


async def time_async(label: str, n: int, fn: Callable[[], Awaitable[object]]) -> list[float]:
    samples = []
    for i in range(1, n + 1):
        t0 = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - t0) * 1e6)
        progress(label, i, n)
    return samples


def time_sync(label: str, n: int, fn: Callable[[], object]) -> list[float]:
    samples = []
    for i in range(1, n + 1):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
        progress(label, i, n)
    return samples


def row(label: str, samples: list[float]) -> str:
    samples = sorted(samples)
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"| {label:<40} | {p50:>9.1f} | {p99:>9.1f} | {1e6 / p50:>10.0f} |"


async def main(n: int) -> None:
    cfg = GuardrailsConfig(
        input=[PiiConfig(), SecretsConfig(), PromptInjectionConfig(), LengthConfig()],
        mesh=MeshConfig(block_threshold=2),
    )
    g = CompiledGuardrails.from_config(cfg)
    clean, dirty = prompt_4kb(False), prompt_4kb(True)
    rows: list[str] = []

    rows.append(
        row(
            "mesh cold, 4 KB clean (no cache)",
            await time_async("cold clean", n, lambda: evaluate([clean], g, cache=None, http=None)),
        )
    )
    rows.append(
        row(
            "mesh cold, 4 KB with PII (no cache)",
            await time_async("cold pii", n, lambda: evaluate([dirty], g, cache=None, http=None)),
        )
    )
    cache = VerdictCache(name="verdicts", max_entries=10000)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        await evaluate([dirty], g, cache=cache, http=None)
        await trio.testing.wait_all_tasks_blocked()
        rows.append(
            row(
                "mesh cached, 4 KB (VerdictCache hit)",
                await time_async("cached", n, lambda: evaluate([dirty], g, cache=cache, http=None)),
            )
        )
        hits = cache.statistics().state["hits"]
        cache.close()
    assert hits >= n, f"expected {n} cache hits, got {hits}"

    text = scan_text([dirty])
    for detector in g.detectors:
        assert isinstance(detector, CheapDetector)
        check = functools.partial(detector.check, text)
        rows.append(row(f"  detector {detector.name}", time_sync(detector.name, n, check)))
    messages = [{"role": "user", "content": dirty}]
    rows.append(
        row(
            "redact_messages, 4 KB with PII",
            time_sync("redact", n, lambda: redact_messages(messages, None, g)),
        )
    )

    print(f"guardrail mesh, {len(clean)}-char prompt, {n} iterations each (microseconds)")
    print(f"| {'case':<40} | {'p50 us':>9} | {'p99 us':>9} | {'per s (p50)':>10} |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 11}|{'-' * 12}|")
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    args = parser.parse_args()
    trio.run(main, max(1, min(args.iterations, 100000)))
