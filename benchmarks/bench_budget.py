"""Pre-flight cost per request: the pure BudgetBook/RateLimiter core vs a call through the actor.

Usage: python benchmarks/bench_budget.py [--n 20000]
Prints progress to stderr and a result table to stdout. Bounded: a few seconds.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import _results
import trio

from sbactor.actors.budget_tracker import BudgetTracker, PreflightRequest
from sbactor.budget.book import BudgetBook
from sbactor.budget.config import BudgetConfig, BudgetSettings, RateLimitConfig, SoftLandingConfig
from sbactor.budget.ratelimit import RateLimiter
from sbactor.budget.scopes import RequestScopes

LANDING = SoftLandingConfig(warn_at=0.8, downgrade_at=0.95, downgrade_to="mini", act_on="forecast")
BUDGETS = [
    BudgetConfig(scope="global", window="month", max_cost_usd=1e9),
    BudgetConfig(scope="team", window="day", max_cost_usd=1e6, soft_landing=LANDING),
    BudgetConfig(scope="user", window="hour", rolling=True, max_tokens=10**12),
    BudgetConfig(scope="key", window="minute", max_cost_usd=1e6),
]
LIMITS = [RateLimitConfig(scope="key", rpm=10**9, tpm=10**12)]
SETTINGS = BudgetSettings(snapshot_path="")


def scopes(i: int) -> RequestScopes:
    return RequestScopes(
        key_id=f"k{i % 50}", user=f"u{i % 200}", team=f"t{i % 10}", model="gpt-4o", tags=()
    )


def bench_core(n: int) -> float:
    book = BudgetBook(BUDGETS, SETTINGS)
    limiter = RateLimiter(LIMITS)
    now = 1_741_608_000.0
    t0 = time.perf_counter()
    for i in range(n):
        s = scopes(i)
        rid = f"r{i}"
        now += 0.001
        limiter.check(s, 1500, now)
        book.soft_landing(s, now)
        book.reserve(rid, s, 0.01, 1500, now)
        limiter.commit(rid, s, 1500, now)
        book.reconcile(rid, 0.005, 800, now)
        limiter.adjust(rid, 800, now)
        _results.progress("core:", i + 1, n)
    return (time.perf_counter() - t0) / n * 1e6


async def bench_actor(n: int, concurrency: int) -> tuple[float, float]:
    tracker = BudgetTracker(
        name="budget", budgets=BUDGETS, rate_limits=LIMITS, settings=SETTINGS, capacity=4096
    )
    latencies: list[float] = []
    done = 0
    per_worker = n // concurrency
    total = per_worker * concurrency  # what is actually sent when n is not a multiple
    async with trio.open_nursery() as nursery:
        await nursery.start(tracker.run)

        async def worker(w: int) -> None:
            nonlocal done
            for j in range(per_worker):
                i = w * n + j
                t = time.perf_counter()
                await tracker.preflight(
                    PreflightRequest(f"r{i}", scopes(i), "gpt-4o", 500, 1000, 0.01)
                )
                latencies.append(time.perf_counter() - t)
                await tracker.reconcile(f"r{i}", 0.005, 800)
                done += 1
                _results.progress(f"actor c={concurrency}:", done, total)

        t0 = time.perf_counter()
        async with trio.open_nursery() as inner:
            for w in range(concurrency):
                inner.start_soon(worker, w)
        elapsed = time.perf_counter() - t0
        await tracker.stop()
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1e6
    return elapsed / total * 1e6, p50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="requests per case")
    args = parser.parse_args()
    started = _results.start()
    n = args.n
    core = bench_core(n)
    rows: list[dict[str, Any]] = [{"path": "pure core (check+soft landing+reserve+reconcile)",
                                   "us_per_request": core, "p50_call_us": None}]
    for c in (1, 32):
        per, p50 = trio.run(bench_actor, n, c)
        rows.append({"path": f"actor preflight call + reconcile cast, c={c}",
                     "us_per_request": per, "p50_call_us": p50})
    print(f"{'path':<52} {'us/request':>12} {'p50 call us':>12}")
    for r in rows:
        p50_text = "-" if r["p50_call_us"] is None else f"{r['p50_call_us']:.1f}"
        print(f"{r['path']:<52} {r['us_per_request']:>12.1f} {p50_text:>12}")
    overhead = rows[1]["us_per_request"] / core
    print(f"actor overhead vs core (c=1): {overhead:.1f}x")
    _results.write(__file__, args, rows, started, keys=["path"],
                   summary={"actor_overhead_vs_core_c1_x": overhead})


if __name__ == "__main__":
    main()
