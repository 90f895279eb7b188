"""Success rate and p99 through the gateway when 20 % of upstream calls fail: resilience on/off.

Usage: python benchmarks/bench_resilience.py [--duration 8] [--concurrency 16] [--latency-ms 20]

The mock upstream (``sbactor mock-upstream``, its own process) fails a random ~11 % of requests
with a 503 (``--fail-rate``); on top of that the client puts a failure marker in 10 % of its
prompts, spread over four causes: a 429 that clears on retry, a 529 overload that clears on
retry, a context-window overflow on gpt-4o and a content filter on gpt-4o. So about 20 % of
first attempts fail, for mixed reasons. The gateway (its own process) runs the example config
examples/llm-aware-resilience/sbactor.yaml with ``resilience.enabled`` true, then false.

A request counts as a success when it is answered 200 with a usable answer (not a
``content_filter`` finish). Bounded: two runs of ``--warmup`` + ``--duration`` seconds plus
start-up. Progress goes to stderr, the result table to stdout.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _results
import attrs
import httpx2
import trio
import yaml

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "llm-aware-resilience" / "sbactor.yaml"
PY = sys.executable

# (share of all requests, marker) — 10 % of requests carry one of these
MARKERS = (
    (0.025, "[mock:status=429,times=1,id={id}]"),
    (0.025, "[mock:overloaded,times=1,id={id}]"),
    (0.025, "[mock:context_length][mock:only_model=gpt-4o]"),
    (0.025, "[mock:content_filter][mock:only_model=gpt-4o]"),
)
MOCK_FAIL_RATE = 0.11  # of the other 90 %: 0.1 + 0.9 * 0.11 ≈ 0.20 of first attempts fail


@attrs.define
class Result:
    mode: str
    latencies: list[float] = attrs.field(factory=list)
    ok: int = 0
    statuses: dict[int, int] = attrs.field(factory=dict)
    attempts: int = 0
    elapsed: float = 0.0

    @property
    def n(self) -> int:
        return len(self.latencies)

    def pct(self, q: float) -> float:
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))] * 1000 if data else 0.0


def prompt(rng: random.Random, i: int) -> str:
    draw = rng.random()
    for share, marker in MARKERS:
        if draw < share:
            return f"question {i} " + marker.format(id=f"b{i}-{rng.getrandbits(32)}")
        draw -= share
    return f"question {i}"


def start(cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start a server that prints '... listening on http://HOST:PORT'; return it and the URL."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {})})
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            return proc, match.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"could not start: {' '.join(cmd)}")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


async def drive(url: str, mode: str, duration: float, concurrency: int, seed: int) -> Result:
    result = Result(mode)
    rng = random.Random(seed)
    counter = 0
    end = trio.current_time() + duration
    limits = httpx2.Limits(max_connections=concurrency)

    async def worker(client: httpx2.AsyncClient) -> None:
        nonlocal counter
        while trio.current_time() < end:
            counter += 1
            body = {"model": "gpt-4o", "max_tokens": 16,
                    "messages": [{"role": "user", "content": prompt(rng, counter)}]}
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=body)
            result.latencies.append(time.perf_counter() - t0)
            result.statuses[r.status_code] = result.statuses.get(r.status_code, 0) + 1
            result.attempts += int(r.headers.get("x-sbactor-attempts", "1"))
            if r.status_code == 200 and r.json()["choices"][0]["finish_reason"] != "content_filter":
                result.ok += 1
            if result.n % 200 == 0:
                print(f"\r{mode}: {result.n} requests, {result.ok} ok", end="", file=sys.stderr,
                      flush=True)

    t0 = time.perf_counter()
    async with httpx2.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker, client)
    result.elapsed = time.perf_counter() - t0
    print(f"\r{mode}: {result.n} requests, {result.ok} ok", file=sys.stderr, flush=True)
    return result


def gateway_config(mock_url: str, enabled: bool) -> dict[str, Any]:
    data = yaml.safe_load(EXAMPLE.read_text())
    for provider in data["providers"]:
        if provider.get("type") == "openai":
            provider["base_url"] = mock_url + "/v1"
    data["resilience"]["enabled"] = enabled
    data["usage_sinks"] = []  # measure resilience, not the usage log
    return data


def run_mode(mock_url: str, enabled: bool, args: argparse.Namespace, tmp: Path) -> Result:
    mode = "resilience on" if enabled else "resilience off"
    cfg = tmp / f"{'on' if enabled else 'off'}.yaml"
    cfg.write_text(yaml.safe_dump(gateway_config(mock_url, enabled)))
    proc, url = start([PY, "-m", "sbactor", "serve", "--config", str(cfg), "--bind",
                       "127.0.0.1:0", "--data-dir", str(tmp / "data")])
    try:
        trio.run(drive, url, f"{mode} (warm-up)", args.warmup, args.concurrency, args.seed + 1)
        return trio.run(drive, url, mode, args.duration, args.concurrency, args.seed)
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per mode")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds first")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="mock upstream latency")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    started = _results.start()
    mock, mock_url = start([PY, "-m", "sbactor", "mock-upstream", "--bind", "127.0.0.1:0",
                            "--latency-ms", str(args.latency_ms), "--fail-rate",
                            str(MOCK_FAIL_RATE), "--fail-status", "503", "--seed",
                            str(args.seed)])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = [run_mode(mock_url, enabled, args, Path(tmp)) for enabled in (False, True)]
    finally:
        stop(mock)
    print(f"\n~20 % of first attempts fail (503 {MOCK_FAIL_RATE:.0%} random; 429, 529, "
          f"context window, content filter 2.5 % each); mock latency {args.latency_ms:g} ms, "
          f"concurrency {args.concurrency}, {args.duration:g} s per mode\n")
    rows: list[dict[str, Any]] = [
        {"mode": r.mode, "requests": r.n, "success_pct": 100 * r.ok / max(r.n, 1),
         "p50_ms": r.pct(0.5), "p99_ms": r.pct(0.99),
         "attempts_per_request": r.attempts / max(r.n, 1), "req_per_s": r.n / r.elapsed,
         "statuses": {str(k): v for k, v in sorted(r.statuses.items())}}
        for r in results
    ]
    print("| mode | requests | success | p50 ms | p99 ms | attempts/req | req/s | statuses |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        statuses = " ".join(f"{k}:{v}" for k, v in r["statuses"].items())
        print(f"| {r['mode']} | {r['requests']} | {r['success_pct']:.1f} % | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['attempts_per_request']:.2f} | {r['req_per_s']:.0f} | "
              f"{statuses} |")
    _results.write(__file__, args, rows, started, keys=["mode"])


if __name__ == "__main__":
    main()
