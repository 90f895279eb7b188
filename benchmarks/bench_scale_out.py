"""Scale-out benchmark: 1 vs 2 workers, and memory vs redis state per-request overhead.

Starts redis-server (from PATH, loopback, no persistence) and the mock upstream as
subprocesses, then runs `sbactor serve` (with a budget and an rpm limit, so every request does
the state round trips) under a bounded load. Progress on stderr, table on stdout. Besides
wall-clock numbers it reports the gateway's CPU time per request (from /proc), which stays
comparable when other processes share the machine.

    python benchmarks/bench_scale_out.py [--seconds 5] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _results
import httpx2
import trio
import yaml

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def config(upstream: int, redis: int | None) -> dict:
    cfg: dict = {
        "server": {"auth": "off", "backlog": 4096},
        "providers": [{"name": "up", "type": "openai",
                       "base_url": f"http://127.0.0.1:{upstream}/v1", "api_key": "x"}],
        "models": [{"name": "m", "deployments": [
            {"provider": "up", "model": "up-m",
             "price": {"input_per_mtok": 1, "output_per_mtok": 2}}]}],
        "budgets": [{"scope": "global", "window": "day", "max_cost_usd": 1_000_000}],
        "budget_settings": {"snapshot_path": ""},
    }
    if redis is not None:
        cfg["state"] = {"backend": "redis", "url": f"redis://127.0.0.1:{redis}/0",
                        "key_prefix": f"bench{time.monotonic_ns()}:"}
    return cfg


async def load(port: int, seconds: float, concurrency: int, label: str) -> tuple[int, float, int]:
    done = errors = 0
    latencies: list[float] = []
    deadline = trio.current_time() + seconds
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}

    async def worker(i: int) -> None:
        nonlocal done, errors
        limits = httpx2.Limits(max_connections=1)
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                      limits=limits) as client:
            while trio.current_time() < deadline:
                t = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body)
                latencies.append(time.perf_counter() - t)
                if r.status_code == 200:
                    done += 1
                else:
                    errors += 1

    async def progress() -> None:
        while trio.current_time() < deadline:
            await trio.sleep(1)
            sys.stderr.write(f"\r  {label}: {done} ok, {errors} errors")
            sys.stderr.flush()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(progress)
        for i in range(concurrency):
            nursery.start_soon(worker, i)
    sys.stderr.write("\n")
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else float("nan")
    return done, p50, errors


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of ``pid`` and its direct children (the workers), from /proc:
    unlike wall-clock numbers it barely moves when other processes share the cores."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def run_case(cfg: dict, workers: int, seconds: float, concurrency: int, label: str,
             tmp: Path) -> tuple[float, float, int, float]:
    path = tmp / f"{label.replace(' ', '_')}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    cmd = [sys.executable, "-m", "sbactor", "serve", "--config", str(path), "--bind",
           f"127.0.0.1:{port}", "--data-dir", str(tmp / label.replace(" ", "_"))]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        time.sleep(1.0 if workers > 1 else 0.3)  # let every worker bind
        trio.run(load, port, 1.0, concurrency, label + " (warm-up)")
        cpu = cpu_seconds(proc.pid)
        done, p50, errors = trio.run(load, port, seconds, concurrency, label)
        cpu = cpu_seconds(proc.pid) - cpu
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return done / seconds, p50, errors, cpu * 1000 / max(done + errors, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    started = _results.start()
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    redis_port, upstream_port = free_port(), free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    upstream = subprocess.Popen([sys.executable, "-m", "sbactor", "mock-upstream", "--bind",
                                 f"127.0.0.1:{upstream_port}"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        wait_port(redis_port)
        wait_port(upstream_port)
        cases = [
            ("memory, 1 worker", config(upstream_port, None), 1, 1),
            ("redis, 1 worker", config(upstream_port, redis_port), 1, 1),
            ("memory, 1 worker", config(upstream_port, None), 1, args.concurrency),
            ("redis, 1 worker", config(upstream_port, redis_port), 1, args.concurrency),
            ("redis, 2 workers", config(upstream_port, redis_port), 2, args.concurrency),
        ]
        for label, cfg, workers, conc in cases:
            name = f"{label} c={conc}"
            rps, p50, errors, cpu = run_case(cfg, workers, args.seconds, conc, name, tmp)
            rows.append((label, conc, rps, p50, errors, cpu))
    finally:
        upstream.terminate()
        redis.terminate()
    print(f"cpus: {os.cpu_count()}  seconds per case: {args.seconds}")
    print(f"{'case':<20} {'conc':>5} {'req/s':>9} {'p50 ms':>8} {'errors':>7} {'cpu ms/req':>11}")
    for label, conc, rps, p50, errors, cpu in rows:
        print(f"{label:<20} {conc:>5} {rps:>9.1f} {p50:>8.2f} {errors:>7} {cpu:>11.2f}")
    base = {(r[0], r[1]): r for r in rows}
    m1, r1 = base[("memory, 1 worker", 1)], base[("redis, 1 worker", 1)]
    print(f"redis overhead per request at c=1: {r1[3] - m1[3]:+.2f} ms (p50), "
          f"{r1[5] - m1[5]:+.2f} ms gateway CPU")
    mc, rc = (base[("memory, 1 worker", args.concurrency)],
              base[("redis, 1 worker", args.concurrency)])
    print(f"redis overhead per request at c={args.concurrency}: {rc[5] - mc[5]:+.2f} ms gateway "
          f"CPU; throughput redis / memory {rc[2] / mc[2]:.2f}x")
    one = base[("redis, 1 worker", args.concurrency)][2]
    two = base[("redis, 2 workers", args.concurrency)][2]
    print(f"2 workers / 1 worker throughput (redis): {two / one:.2f}x")
    _results.write(__file__, args, [
        {"case": label, "concurrency": conc, "req_per_s": rps, "p50_ms": p50, "errors": errors,
         "cpu_ms_per_req": cpu} for label, conc, rps, p50, errors, cpu in rows
    ], started, keys=["case", "concurrency"], summary={
        "redis_overhead_c1_p50_ms": r1[3] - m1[3], "redis_overhead_c1_cpu_ms": r1[5] - m1[5],
        "redis_overhead_cN_cpu_ms": rc[5] - mc[5], "redis_vs_memory_cN_throughput_x": rc[2] / mc[2],
        "two_vs_one_worker_throughput_x": two / one})


if __name__ == "__main__":
    main()
