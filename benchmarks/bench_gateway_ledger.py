"""Gateway throughput with the verifiable ledger off vs on, measured in the same run.

Each variant is a real ``sbactor serve`` subprocess with an in-process mock provider (no upstream
latency, so the gateway's own cost is what is measured). The cells are interleaved: in every
round each variant is loaded in turn for ``--duration`` seconds by N concurrent client tasks
(trio + httpx2, keep-alive), so drift on a shared machine hits all variants alike.

Variants:
  off     no usage sink at all
  batch   signed ledger, durability batch, fsync batch (one fsync per group commit)
  strict  signed ledger, durability strict, fsync batch (each response waits for its fsync)

At the end every ledger is verified with its public key. Bounded: rounds x variants x
(duration + warm-up), about 35 s with the defaults. Besides req/s (sensitive to whatever else
runs on the machine) it reports the gateway process's CPU time per request (/proc), which is not.

    /work/venv/bin/python benchmarks/bench_gateway_ledger.py [--duration 3] [--rounds 3]
                         [--concurrency 16] [--variants off,batch,strict]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _results
import httpx2
import trio
import yaml

from sbactor.ledger.chain import SigningKey
from sbactor.ledger.verify import verify

SEED = "5a" * 32
LEDGERS: dict[str, dict[str, Any] | None] = {
    "off": None,
    "batch": {"durability": "batch", "fsync": "batch"},
    "strict": {"durability": "strict", "fsync": "batch"},
}
BODY = {"model": "m", "messages": [{"role": "user", "content": "benchmark the ledger"}],
        "max_tokens": 16}


def config_for(variant: str) -> dict[str, Any]:
    ledger = LEDGERS[variant]
    return {
        "server": {"auth": "off", "log_level": "warning", "shutdown_grace_s": 5},
        "providers": [{"name": "local", "type": "mock", "latency_ms": 0, "seed": 1}],
        "models": [{"name": "m", "deployments": [
            {"provider": "local", "model": "local-m",
             "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}]}],
        "usage_sinks": [] if ledger is None else [
            {"type": "ledger", "path": "ledger", "signing_seed_hex": SEED, **ledger}],
    }


async def start_gateway(workdir: Path, variant: str) -> tuple[trio.Process, str]:
    cfg = workdir / f"{variant}.yaml"
    cfg.write_text(yaml.safe_dump(config_for(variant)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBACTOR_")}
    log = (workdir / f"{variant}.stderr").open("wb")
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "sbactor", "serve", "--config", str(cfg), "--bind",
         "127.0.0.1:0", "--data-dir", str(workdir / variant)],
        stdout=-1, stderr=log, env=env,
    )
    log.close()
    assert process.stdout is not None
    buffer = b""
    marker = b"sbactor listening on http://"
    with trio.fail_after(30):
        while b"\n" not in buffer.partition(marker)[2]:
            chunk = await process.stdout.receive_some(4096)
            if not chunk:
                raise SystemExit(f"{variant}: gateway did not start; see {log.name}")
            buffer += chunk
    return process, buffer.partition(marker)[2].split(b"\n", 1)[0].decode().strip()


async def load(url: str, duration: float, concurrency: int) -> tuple[int, int, list[float]]:
    """N tasks post back to back for ``duration`` s; returns (ok, errors, latencies in s)."""
    latencies: list[float] = []
    counts = {"ok": 0, "err": 0}
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=BODY)
                if r.status_code == 200:
                    counts["ok"] += 1
                    latencies.append(time.perf_counter() - t0)
                else:
                    counts["err"] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    return counts["ok"], counts["err"], latencies


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc): robust to other load on a shared machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> None:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(LEDGERS)
    if unknown:
        raise SystemExit(f"unknown variant(s): {', '.join(sorted(unknown))}")
    started = _results.start()
    rates: dict[str, list[float]] = {v: [] for v in variants}
    lat: dict[str, list[float]] = {v: [] for v in variants}
    errors: dict[str, int] = dict.fromkeys(variants, 0)
    cpu: dict[str, float] = dict.fromkeys(variants, 0.0)
    served: dict[str, int] = dict.fromkeys(variants, 0)
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        workdir = Path(tmp)
        gateways = {v: await start_gateway(workdir, v) for v in variants}
        try:
            for _, address in gateways.values():  # warm-up, not measured
                await load(f"http://{address}", args.warmup, args.concurrency)
            for round_no in range(args.rounds):
                order = variants if round_no % 2 == 0 else list(reversed(variants))
                for variant in order:
                    process, address = gateways[variant]
                    cpu0 = cpu_seconds(process.pid)
                    ok, err, latencies = await load(
                        f"http://{address}", args.duration, args.concurrency
                    )
                    cpu[variant] += cpu_seconds(process.pid) - cpu0
                    served[variant] += ok
                    rates[variant].append(ok / args.duration)
                    lat[variant].extend(latencies)
                    errors[variant] += err
                    print(f"round {round_no + 1}/{args.rounds} {variant:>6}: "
                          f"{ok / args.duration:8.0f} req/s ({err} errors)",
                          file=sys.stderr, flush=True)
        finally:
            for process, _ in gateways.values():
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            with trio.move_on_after(30):
                for process, _ in gateways.values():
                    await process.wait()
            for process, _ in gateways.values():
                if process.returncode is None:
                    process.kill()
        public = SigningKey.from_seed_hex(SEED).public
        checks = {}
        for variant in variants:
            if LEDGERS[variant] is not None:
                report = verify(workdir / variant / "ledger", public_key=public)
                checks[variant] = ("ok" if report.ok else "BROKEN", report.entries)

    base = statistics.median(rates[variants[0]]) if rates[variants[0]] else float("nan")
    print(f"\nconcurrency {args.concurrency}, {args.rounds} rounds x {args.duration:g} s per "
          f"cell, interleaved; mock provider in-process (0 ms)\n")
    rows = []
    for variant in variants:
        r = rates[variant]
        median = statistics.median(r)
        verdict, entries = checks.get(variant, (None, None))
        rows.append({"ledger": variant, "median_req_per_s": median, "min_req_per_s": min(r),
                     "max_req_per_s": max(r), "vs_first_pct": 100 * median / base,
                     "p50_ms": 1000 * pct(lat[variant], 0.5),
                     "p99_ms": 1000 * pct(lat[variant], 0.99),
                     "gateway_cpu_ms_per_req": 1000 * cpu[variant] / max(1, served[variant]),
                     "errors": errors[variant], "verify": verdict, "verified_entries": entries})
    print("| ledger | median req/s | min-max req/s | vs " + variants[0]
          + " | p50 ms | p99 ms | gateway CPU ms/req | errors | verify |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        check = f"{row['verify']} ({row['verified_entries']} entries)" if row["verify"] else "-"
        print(f"| {row['ledger']} | {row['median_req_per_s']:.0f} | "
              f"{row['min_req_per_s']:.0f}-{row['max_req_per_s']:.0f} | "
              f"{row['vs_first_pct']:.0f} % | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
              f"{row['gateway_cpu_ms_per_req']:.2f} | {row['errors']} | {check} |")
    _results.write(__file__, args, rows, started, keys=["ledger"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--variants", default="off,batch,strict")
    trio.run(main, parser.parse_args())
