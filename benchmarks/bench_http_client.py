"""httpx vs httpx2 vs sbactor's own pool (providers/_wire.py) under trio, against the mock
upstream (a separate process). The CPU column is this process's CPU per request: what the
client costs the gateway.

For each client and each concurrency level, N tasks share ONE client (as a provider does) and
POST non-streaming chat completions for a fixed duration. Prints req/s and latency percentiles.

    /work/venv/bin/python benchmarks/bench_http_client.py [--duration 3] [--levels 1,32,128]
        [--max-connections 256]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from typing import Any

import _results
import orjson
import trio

BODY = orjson.dumps({"model": "gpt-4o-mini",
                     "messages": [{"role": "user", "content": "benchmark me"}]})


async def run_level(module: Any, url: str, concurrency: int, duration: float,
                    pool: int) -> dict[str, float]:
    limits = module.Limits(max_connections=pool, max_keepalive_connections=pool)
    latencies: list[float] = []
    errors = 0
    async with module.AsyncClient(limits=limits, timeout=30.0, trust_env=False) as client:
        headers = {"content-type": "application/json"}
        for _ in range(min(concurrency, 8)):  # warm a few connections
            await client.post(url, content=BODY, headers=headers)
        deadline = trio.current_time() + duration

        async def worker() -> None:
            nonlocal errors
            while trio.current_time() < deadline:
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, content=BODY, headers=headers)
                    if r.status_code != 200:
                        errors += 1
                except module.HTTPError:
                    errors += 1
                latencies.append(time.perf_counter() - t0)

        start, cpu0 = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return _summary(latencies, errors, elapsed, cpu)


async def run_level_wire(url: str, concurrency: int, duration: float,
                         pool: int) -> dict[str, float]:
    from sbactor.providers._wire import WireError, WirePool

    base, _, path = url.partition("/v1")
    client = WirePool(base + "/v1", headers={"content-type": "application/json"},
                      max_connections=pool, connect_timeout_s=5, read_timeout_s=30)
    latencies: list[float] = []
    errors = 0

    async def one() -> None:
        nonlocal errors
        t0 = time.perf_counter()
        try:
            async with client.post(path, BODY) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
        except WireError:
            errors += 1
        latencies.append(time.perf_counter() - t0)

    for _ in range(min(concurrency, 8)):
        await one()
    latencies.clear()
    deadline = trio.current_time() + duration

    async def worker() -> None:
        while trio.current_time() < deadline:
            await one()

    start, cpu0 = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    await client.aclose()
    return _summary(latencies, errors, elapsed, cpu)


def _summary(latencies: list[float], errors: int, elapsed: float, cpu: float) -> dict[str, float]:
    latencies.sort()
    n = len(latencies)
    return {"rps": n / elapsed, "n": n, "errors": errors, "cpu_us": cpu / max(n, 1) * 1e6,
            "p50": statistics.median(latencies) * 1000,
            "p99": latencies[min(n - 1, int(n * 0.99))] * 1000}


async def main(args: argparse.Namespace) -> None:
    started = _results.start()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "sbactor.upstream_mock.cli", "mock-upstream", "--bind",
         "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(15):
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(1)
        url = line.decode().split()[-1] + "/v1/chat/completions"
        import httpx
        import httpx2

        rows = []
        levels = [int(x) for x in args.levels.split(",")]
        for name, module in (("httpx " + httpx.__version__, httpx),
                             ("httpx2 " + httpx2.__version__, httpx2)):
            for c in levels:
                print(f"… {name} concurrency={c} pool={args.max_connections} "
                      f"for {args.duration}s", file=sys.stderr, flush=True)
                rows.append((name, c, await run_level(module, url, c, args.duration,
                                                      args.max_connections)))
        for c in levels:
            print(f"… wire (httptools) concurrency={c}", file=sys.stderr, flush=True)
            rows.append(("sbactor wire", c, await run_level_wire(url, c, args.duration,
                                                                 args.max_connections)))
    finally:
        proc.terminate()
        await proc.wait()
    print(f"pool max_connections={args.max_connections}")
    print(f"{'client':<14} {'conc':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'cpu us/req':>10} {'requests':>9} {'errors':>7}")
    for name, c, r in rows:
        print(f"{name:<14} {c:>5} {r['rps']:>8.0f} {r['p50']:>8.1f} {r['p99']:>8.1f} "
              f"{r['cpu_us']:>10.0f} {int(r['n']):>9} {int(r['errors']):>7}")
    _results.write(__file__, args, [
        {"client": name, "concurrency": c, "req_per_s": r["rps"], "p50_ms": r["p50"],
         "p99_ms": r["p99"], "cpu_us_per_req": r["cpu_us"], "requests": int(r["n"]),
         "errors": int(r["errors"])}
        for name, c, r in rows
    ], started, keys=["client", "concurrency"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per cell")
    parser.add_argument("--levels", default="1,32,128", help="concurrency levels")
    parser.add_argument("--max-connections", type=int, default=256,
                        help="client pool size (below the concurrency, requests queue)")
    trio.run(main, parser.parse_args())
