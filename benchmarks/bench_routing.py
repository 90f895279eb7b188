"""Routing benchmark: cost per successful request under a changing provider mix, and µs/choice.

Simulates one public model with three deployments whose refusal/error rates and realized prices
change over four phases, and routes the same request stream with ``round_robin``, ``cheapest``
and ``outcome_aware``. A failed attempt (refusal or 5xx) fails over to the strategy's next choice
among the untried deployments, so every request is eventually served and wasted attempts show up
in the cost per successful request. Every attempt feeds the same pure update/decay code the
FeedbackStore runs.

Then the time of one choice itself (µs per call: mean, p50, p99): ``choose`` for every strategy
(3 candidates, past warm-up), the gateway's call (``FeedbackStore.route``) and one stats update.

    /work/venv/bin/python benchmarks/bench_routing.py [--per-phase 10000] [--seed 7] [--choices N]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import _results
import attrs

from sbactor.actors.feedback_store import FeedbackStore
from sbactor.routing import (
    STRATEGIES,
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


def simulate(strategy: str, per_phase: int, seed: int) -> list[Tally]:
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
            _results.progress(f"{strategy}: phase {name!r}", i + 1, per_phase)
        tallies.append(tally)
    return tallies


def warm_stats() -> dict[str, DeploymentStats]:
    """Past warm-up, one clearly cheapest deployment, stats 10 s old (so they decay)."""
    return {c.deployment_id: DeploymentStats(samples=10, successes=9, ewma_cost=0.001 * (i + 1),
                                             ewma_success=0.9, ewma_latency=0.3, last_update=0.0)
            for i, c in enumerate(CANDIDATES)}


def time_calls(label: str, fn: Callable[[int], object], n: int) -> dict[str, float]:
    """µs per call of ``fn(i)``: the mean over a plain loop, then p50/p99 of timed calls."""
    for i in range(min(n, 1000)):
        fn(i)
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    mean = (time.perf_counter() - start) / n * 1e6
    samples = []
    for i in range(1, n + 1):
        t0 = time.perf_counter_ns()
        fn(i)
        samples.append(time.perf_counter_ns() - t0)
        _results.progress(f"timing {label}", i, n)
    samples.sort()
    return {"mean_us": mean, "p50_us": samples[n // 2] / 1000,
            "p99_us": samples[min(n - 1, int(n * 0.99))] / 1000}


def choice_rows(n: int) -> list[dict[str, Any]]:
    """Time the choice itself: ``choose`` per strategy (3 candidates), the gateway's call
    (``FeedbackStore.route``: Router.pick + the share window) and one stats update."""
    settings = RoutingSettings()
    rng = random.Random(1)
    stats = warm_stats()
    rows: list[dict[str, Any]] = []
    for s in STRATEGIES:
        def pick(i: int, s: str = s) -> object:
            return choose(s, CANDIDATES, stats, counter=i, rng=rng, settings=settings, now=10.0)
        rows.append({"section": "choice", "strategy": s, **time_calls(s, pick, n)})
    store = FeedbackStore(settings=settings, clock=lambda: 10.0, rng=random.Random(1))
    store._stats = MappingProxyType(stats)  # what record_outcome would have built
    label = "outcome_aware via FeedbackStore.route"
    rows.append({"section": "choice", "strategy": label, **time_calls(
        label, lambda i: store.route("chat", "outcome_aware", CANDIDATES), n)})
    o = Outcome("r", "d", "m", success=True, cost_usd=0.001, latency_s=0.3)
    label = "stats update (decay + EWMA)"
    rows.append({"section": "update", "strategy": label, **time_calls(
        label, lambda i: update_stats(decay(stats["chat/mid/1"], float(i), 300.0), o, 0.2,
                                      float(i)), n)})
    return rows


def _cell(t: Tally) -> str:
    return f"${t.per_1k_success():.3f} ({t.attempts / t.requests:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-phase", type=int, default=10000, help="requests per phase")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--choices", type=int, default=20000,
                        help="timed calls per strategy in the µs-per-choice section")
    args = parser.parse_args()
    per_phase = max(100, min(args.per_phase, 200_000))
    started = _results.start()

    strategies = ["round_robin", "cheapest", "outcome_aware"]
    results = {s: simulate(s, per_phase, args.seed) for s in strategies}
    totals = {s: Tally(sum(t.cost for t in results[s]), sum(t.requests for t in results[s]),
                       sum(t.attempts for t in results[s]), sum(t.successes for t in results[s]))
              for s in strategies}
    phases = [(name, {s: results[s][p] for s in strategies}) for p, (name, _) in enumerate(PHASES)]
    phases.append(("all phases", totals))
    rows: list[dict[str, Any]] = [
        {"section": "cost", "phase": name, "strategy": s,
         "usd_per_1k_success": tallies[s].per_1k_success(),
         "attempts_per_request": tallies[s].attempts / tallies[s].requests}
        for name, tallies in phases for s in strategies
    ]

    print(f"\nUSD per 1,000 successful requests ({per_phase} requests per phase, 10 req/s)")
    print(f"{'phase':<26}" + "".join(f"{s:>22}" for s in strategies))
    for name, tallies in phases:
        print(f"{name:<26}" + "".join(f"{_cell(tallies[s]):>22}" for s in strategies))
    base = totals["outcome_aware"].per_1k_success()
    saves = {s: 1 - base / totals[s].per_1k_success() for s in strategies[:-1]}
    print("outcome_aware saves "
          + ", ".join(f"{saved:.0%} vs {s}" for s, saved in saves.items())
          + "  (in parentheses: attempts per request)")

    choices = choice_rows(max(100, args.choices))
    rows += choices
    print(f"\nµs per routing choice (3 candidates, {max(100, args.choices)} calls each)")
    print(f"  {'strategy':<38} {'mean':>6} {'p50':>6} {'p99':>6}")
    for r in choices:
        print(f"  {r['strategy']:<38} {r['mean_us']:6.2f} {r['p50_us']:6.2f} {r['p99_us']:6.2f}")
    _results.write(__file__, args, rows, started, keys=["section", "phase", "strategy"],
                   summary={f"outcome_aware_saves_vs_{s}_pct": 100 * saved
                            for s, saved in saves.items()})


if __name__ == "__main__":
    main()
