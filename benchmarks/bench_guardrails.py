"""Guardrail mesh cost per request for a ~4 KB prompt: cold (every detector runs), cached
(VerdictCache hit through the actor's mailbox), per detector, and redaction; then gateway
throughput with the mesh off / on (cache off) / on (cache on), measured in one run.

    /work/venv/bin/python benchmarks/bench_guardrails.py [--iterations N] [--requests N]

Bounded: a few thousand evaluations and a few hundred HTTP requests per gateway mode. The mock
upstream, the gateway and the load generator share one process and one trio loop, so absolute
req/s are pessimistic; the on/off *ratio* is the number to read. Progress on stderr.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import _results
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


async def time_async(label: str, n: int, fn: Callable[[], Awaitable[object]]) -> list[float]:
    samples = []
    for i in range(1, n + 1):
        t0 = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - t0) * 1e6)
        _results.progress(f"{label:<34}", i, n)
    return samples


def time_sync(label: str, n: int, fn: Callable[[], object]) -> list[float]:
    samples = []
    for i in range(1, n + 1):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
        _results.progress(f"{label:<34}", i, n)
    return samples


def row(label: str, samples: list[float]) -> dict[str, Any]:
    samples = sorted(samples)
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return {"section": "mesh", "case": label, "p50_us": p50, "p99_us": p99,
            "per_s_at_p50": 1e6 / p50}


async def gateway_throughput(requests: int, concurrency: int = 8) -> list[dict[str, Any]]:
    """req/s through the real gateway with a 4 KB prompt, per guardrails setting."""
    import tempfile
    from pathlib import Path

    import httpx2

    from sbactor.config import parse_config
    from sbactor.server import run_gateway
    from sbactor.upstream_mock.scenarios import Settings
    from sbactor.upstream_mock.server import MockUpstreamApp, serve_mock

    detectors = [{"type": "pii"}, {"type": "secrets"}, {"type": "prompt_injection"}]
    modes: list[tuple[str, dict[str, object] | None]] = [
        ("gateway, guardrails off", None),
        ("gateway, mesh on, cache off", {"input": detectors, "mesh": {"cache": False}}),
        ("gateway, mesh on, cache on", {"input": detectors, "mesh": {"cache": True}}),
    ]
    prompt = prompt_4kb(False)
    lines = []
    async with trio.open_nursery() as nursery:
        app = MockUpstreamApp(Settings())
        upstream = await nursery.start(
            lambda task_status: serve_mock(
                "127.0.0.1:0", app=app, quiet=True, task_status=task_status
            )
        )
        for label, guardrails in modes * 2:  # two interleaved rounds; the best one counts
            data: dict[str, object] = {
                "server": {"auth": "off", "log_level": "error"},
                "providers": [
                    {
                        "name": "up",
                        "type": "openai",
                        "base_url": f"http://{upstream}/v1",
                        "api_key": "x",
                    }
                ],
                "models": [{"name": "m", "deployments": [{"provider": "up", "model": "m"}]}],
            }
            if guardrails is not None:
                data["guardrails"] = guardrails
            shutdown = trio.Event()
            with tempfile.TemporaryDirectory() as tmp:
                _, address = await nursery.start(
                    lambda task_status, d=data, t=tmp, e=shutdown: run_gateway(
                        parse_config(d, env={}),
                        Path(t),
                        "127.0.0.1:0",
                        shutdown=e,
                        task_status=task_status,
                    )
                )
                body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
                done = 0
                async with httpx2.AsyncClient(base_url=f"http://{address}", timeout=30) as c:
                    await c.post("/v1/chat/completions", json=body)  # warm up

                    async def worker(
                        count: int,
                        client: httpx2.AsyncClient = c,
                        body: dict[str, Any] = body,
                        label: str = label,
                    ) -> None:
                        nonlocal done
                        for _ in range(count):
                            r = await client.post("/v1/chat/completions", json=body)
                            assert r.status_code == 200, r.text
                            done += 1
                            _results.progress(f"{label:<34}", done, requests)

                    t0 = time.perf_counter()
                    async with trio.open_nursery() as load:
                        for i in range(concurrency):
                            load.start_soon(
                                worker, requests // concurrency + (i < requests % concurrency)
                            )
                    elapsed = time.perf_counter() - t0
                shutdown.set()
                lines.append((label, requests / elapsed, elapsed / requests * 1000))
        nursery.cancel_scope.cancel()
    best = {label: max(rps for lbl, rps, _ in lines if lbl == label) for label, _ in modes}
    base = best[modes[0][0]]
    return [
        {"section": "gateway", "case": label, "req_per_s": rps, "ms_per_req": 1000 / rps,
         "vs_off_x": rps / base}
        for label, rps in best.items()
    ]


async def main(n: int, requests: int) -> None:
    started = _results.start()
    cfg = GuardrailsConfig(
        input=[PiiConfig(), SecretsConfig(), PromptInjectionConfig(), LengthConfig()],
        mesh=MeshConfig(block_threshold=2),
    )
    g = CompiledGuardrails.from_config(cfg)
    clean, dirty = prompt_4kb(False), prompt_4kb(True)
    rows: list[dict[str, Any]] = []

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
    for r in rows:
        print(f"| {r['case']:<40} | {r['p50_us']:>9.1f} | {r['p99_us']:>9.1f} | "
              f"{r['per_s_at_p50']:>10.0f} |")
    if requests > 0:
        gw_rows = await gateway_throughput(requests)
        print(f"\ngateway throughput, 4 KB prompt, {requests} requests, concurrency 8")
        print(f"| {'case':<40} | {'req/s':>9} | {'ms/req':>9} | {'vs off':>11} |")
        print(f"|{'-' * 42}|{'-' * 11}|{'-' * 11}|{'-' * 13}|")
        for r in gw_rows:
            print(f"| {r['case']:<40} | {r['req_per_s']:>9.0f} | {r['ms_per_req']:>9.2f} | "
                  f"{r['vs_off_x']:>10.2f}x |")
        rows += gw_rows
    _results.write(__file__, {"iterations": n, "requests": requests}, rows, started,
                   keys=["section", "case"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=600, help="per gateway mode; 0 = skip")
    args = parser.parse_args()
    trio.run(main, max(1, min(args.iterations, 100000)), max(0, min(args.requests, 20000)))
