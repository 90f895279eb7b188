"""Routing benchmark: cost per successful request under a changing provider mix, and µs/choice.

Simulates one public model with three deployments whose refusal/error rates and realized prices
change over four phases, and routes the same request stream with ``round_robin``, ``cheapest``
and ``outcome_aware``. A failed attempt (refusal or 5xx) fails over to the strategy's next choice
among the untried deployments, so every request is eventually served and wasted attempts show up
in the cost per successful request. Every attempt feeds the same pure update/decay code the
FeedbackStore runs.

    /work/venv/bin/python benchmarks/bench_routing.py [--per-phase 10000] [--seed 7]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable

import attrs

from sbactor.routing import (
    Candidate,
    DeploymentStats,
    Outcome,
    Router,
    RoutingSettings,
    choose,
    decay,
    update_stats,
)

CANDIDATES = [
    Candidate("chat/cheap/0", "cheap", "small", input_per_mtok=0.15, output_per_mtok=0.60),
    Candidate("chat/mid/1", "mid", "medium", input_per_mtok=0.50, output_per_mtok=1.50),
    Candidate("chat/premium/2", "premium", "large", input_per_mtok=2.50, output_per_mtok=10.0),
]


@attrs.frozen
class Behaviour:
    refuse: float = 0.0  # provider refuses (content filter): prompt billed, not a success
    error: float = 0.0  # 5xx / timeout: nothing billed, not a success
    price_factor: float = 1.0  # realized cost vs list price (repricing, verbose outputs)


PHASES: list[tuple[str, dict[str, Behaviour]]] = [
    ("1 calm", {"cheap": Behaviour(refuse=0.05), "mid": Behaviour(), "premium": Behaviour()}),
    ("2 cheap refuses 60%", {"cheap": Behaviour(refuse=0.60), "mid": Behaviour(),
                             "premium": Behaviour()}),
    ("3 cheap ok, mid 40% 5xx", {"cheap": Behaviour(refuse=0.02), "mid": Behaviour(error=0.4),
                                 "premium": Behaviour()}),
    ("4 cheap realized x6", {"cheap": Behaviour(price_factor=6.0), "mid": Behaviour(),
                             "premium": Behaviour(refuse=0.1)}),
]


@attrs.define
class Tally:
    cost: float = 0.0
    requests: int = 0
    attempts: int = 0
    successes: int = 0

    def per_1k_success(self) -> float:
        return float("inf") if self.successes == 0 else 1000 * self.cost / self.successes


def serve(c: Candidate, b: Behaviour, rng: random.Random, rid: str, now: float) -> Outcome:
    tokens_in = rng.randint(500, 1500)
    tokens_out = rng.randint(100, 500)
    full = b.price_factor * (tokens_in * c.input_per_mtok + tokens_out * c.output_per_mtok) / 1e6
    prompt = b.price_factor * tokens_in * c.input_per_mtok / 1e6
    latency = 0.2 + tokens_out / 1000
    roll = rng.random()
    if roll < b.error:
        return Outcome(rid, c.deployment_id, "chat", success=False, latency_s=latency)
    if roll < b.error + b.refuse:
        return Outcome(rid, c.deployment_id, "chat", success=False, refused=True,
                       cost_usd=prompt, latency_s=latency)
    return Outcome(rid, c.deployment_id, "chat", success=True, cost_usd=full, latency_s=latency)


def simulate(strategy: str, per_phase: int, seed: int,
             progress: Callable[[str], None]) -> list[Tally]:
    settings = RoutingSettings()
    router = Router(settings, random.Random(seed))
    world = random.Random(seed + 1)  # same outcome randomness for every strategy
    stats: dict[str, DeploymentStats] = {}
    tallies = []
    now = 0.0
    for name, behaviours in PHASES:
        tally = Tally()
        for i in range(per_phase):
            now += 0.1  # 10 requests per second
            tally.requests += 1
            remaining = list(CANDIDATES)
            while remaining:  # failover: the next choice among deployments not yet tried
                c = router.pick("chat", strategy, remaining, stats, now)
                o = serve(c, behaviours[c.provider], world, f"{name}-{i}", now)
                stats[c.deployment_id] = update_stats(
                    decay(stats.get(c.deployment_id, DeploymentStats()), now, settings.decay_s),
                    o, settings.alpha, now)
                tally.cost += o.cost_usd
                tally.attempts += 1
                if o.success:
                    tally.successes += 1
                    break
                remaining.remove(c)
        tallies.append(tally)
        progress(f"{strategy}: phase {name!r} done")
    return tallies


def us_per_choice(strategy: str, n: int = 20000) -> float:
    settings = RoutingSettings()
    rng = random.Random(1)
    stats = {c.deployment_id: DeploymentStats(samples=10, successes=9, ewma_cost=0.001 * (i + 1),
                                              ewma_success=0.9, ewma_latency=0.3, last_update=0.0)
             for i, c in enumerate(CANDIDATES)}
    start = time.perf_counter()
    for i in range(n):
        choose(strategy, CANDIDATES, stats, counter=i, rng=rng, settings=settings, now=10.0)
    return (time.perf_counter() - start) / n * 1e6


def us_per_update(n: int = 20000) -> float:
    o = Outcome("r", "d", "m", success=True, cost_usd=0.001, latency_s=0.3)
    s = DeploymentStats()
    start = time.perf_counter()
    for i in range(n):
        s = update_stats(decay(s, float(i), 300.0), o, 0.2, float(i))
    return (time.perf_counter() - start) / n * 1e6


def _cell(t: Tally) -> str:
    return f"${t.per_1k_success():.3f} ({t.attempts / t.requests:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-phase", type=int, default=10000, help="requests per phase")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    per_phase = max(100, min(args.per_phase, 200_000))

    def progress(msg: str) -> None:
        print(f"[bench_routing] {msg}", file=sys.stderr, flush=True)

    strategies = ["round_robin", "cheapest", "outcome_aware"]
    results = {s: simulate(s, per_phase, args.seed, progress) for s in strategies}

    print(f"\nUSD per 1,000 successful requests ({per_phase} requests per phase, 10 req/s)")
    print(f"{'phase':<26}" + "".join(f"{s:>22}" for s in strategies))
    for p, (name, _) in enumerate(PHASES):
        cells = [_cell(results[s][p]) for s in strategies]
        print(f"{name:<26}" + "".join(f"{c:>22}" for c in cells))
    totals = {s: Tally(sum(t.cost for t in results[s]), sum(t.requests for t in results[s]),
                       sum(t.attempts for t in results[s]), sum(t.successes for t in results[s]))
              for s in strategies}
    cells = [_cell(totals[s]) for s in strategies]
    print(f"{'all phases':<26}" + "".join(f"{c:>22}" for c in cells))
    base = totals["outcome_aware"].per_1k_success()
    print("outcome_aware saves "
          + ", ".join(f"{1 - base / totals[s].per_1k_success():.0%} vs {s}"
                      for s in strategies[:-1])
          + "  (in parentheses: attempts per request)")

    progress("timing choices")
    print("\nµs per routing choice (3 candidates)")
    for s in ["round_robin", "weighted", "lowest_latency", "cheapest", "fallback_chain",
              "outcome_aware"]:
        print(f"  {s:<16} {us_per_choice(s):6.2f}")
    print(f"  {'stats update':<16} {us_per_update():6.2f}  (decay + EWMA, per outcome)")


if __name__ == "__main__":
    main()
