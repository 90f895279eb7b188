"""Pure routing core: stats, score, decay and every strategy's choice."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import attrs
import pytest

from sbactor.routing import (
    COST_FLOOR_USD,
    STRATEGIES,
    Candidate,
    DeploymentStats,
    NoCandidates,
    Outcome,
    Router,
    RoutingSettings,
    ShareWindow,
    apply_feedback,
    choose,
    decay,
    fallback_order,
    score,
    score_at,
    update_stats,
)

A = Candidate("m/a/0", "a", "up-a", input_per_mtok=3.0, output_per_mtok=15.0, weight=1, priority=2)
B = Candidate("m/b/1", "b", "up-b", input_per_mtok=0.5, output_per_mtok=1.5, weight=3, priority=1)
C = Candidate("m/c/2", "c", "up-c", input_per_mtok=1.0, output_per_mtok=1.0, weight=0, priority=1)
ABC = (A, B, C)


def stats(**kw: float | int | None) -> DeploymentStats:
    base: dict[str, float | int | None] = {"samples": 10, "successes": 10}
    base.update(kw)
    return DeploymentStats(**base)  # type: ignore[arg-type]


# ---- score ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("st", "latency_weight", "expected"),
    [
        (DeploymentStats(), 0.0, 0.0),  # unknown: optimistic
        (stats(ewma_cost=0.01), 0.0, 0.01),
        (stats(ewma_cost=0.01, ewma_success=0.5), 0.0, 0.02),
        (stats(ewma_cost=0.01, ewma_success=0.5, ewma_refusal=0.5), 0.0, 0.03),
        (stats(ewma_cost=0.01, ewma_refusal=1.0), 0.0, 0.02),
        (stats(ewma_cost=0.01, ewma_latency=2.0), 0.5, 0.02),
        (stats(ewma_cost=0.01, ewma_latency=2.0), 0.0, 0.01),
        (stats(ewma_cost=0.0), 0.0, COST_FLOOR_USD),
        (stats(ewma_cost=0.0, ewma_success=0.5), 0.0, 2 * COST_FLOOR_USD),
        (stats(ewma_cost=0.01, successes=0, ewma_success=0.9), 0.0, math.inf),
        (stats(ewma_cost=0.01, ewma_success=0.0), 0.0, math.inf),
    ],
)
def test_score_table(st: DeploymentStats, latency_weight: float, expected: float) -> None:
    assert score(st, latency_weight) == pytest.approx(expected)


def test_update_stats_ewma() -> None:
    s = DeploymentStats()
    first = Outcome("r1", "d", "m", success=True, cost_usd=0.01, latency_s=1.0)
    s = update_stats(s, first, 0.2, 1.0)
    assert (s.samples, s.successes, s.ewma_cost, s.ewma_latency, s.ewma_success) == (
        1, 1, 0.01, 1.0, 1.0)
    s = update_stats(s, Outcome("r2", "d", "m", success=False, refused=True, cost_usd=0.0,
                                latency_s=2.0), 0.2, 2.0)
    assert s.samples == 2 and s.successes == 1 and s.refusals == 1
    assert s.ewma_cost == pytest.approx(0.008)
    assert s.ewma_latency == pytest.approx(1.2)
    assert s.ewma_success == pytest.approx(0.8)
    assert s.ewma_refusal == pytest.approx(0.2)
    assert s.last_update == 2.0


def test_feedback_moves_success_only() -> None:
    s = stats(ewma_cost=0.01, ewma_success=1.0, last_update=0.0)
    f = apply_feedback(s, 0.0, 0.2, 5.0)
    assert f.ewma_success == pytest.approx(0.8) and f.feedback == 1 and f.samples == 10
    assert score(f) > score(s)
    assert apply_feedback(s, 7.0, 0.2, 5.0).ewma_success == 1.0  # clamped


def test_decay_toward_prior_and_memoryless() -> None:
    s = stats(ewma_cost=0.01, ewma_success=0.5, ewma_refusal=0.5, last_update=100.0)
    one = decay(s, 100.0 + 300.0, 300.0)
    assert one.ewma_success == pytest.approx(1 - 0.5 / math.e)
    assert one.ewma_refusal == pytest.approx(0.5 / math.e)
    assert one.ewma_cost == 0.01 and one.samples == 10
    two = decay(decay(s, 250.0, 300.0), 400.0, 300.0)
    assert two.ewma_success == pytest.approx(one.ewma_success)
    assert decay(s, None, 300.0) is s and decay(s, 50.0, 300.0) is s
    assert decay(s, 1e9, 300.0).ewma_refusal == pytest.approx(0.0)


@pytest.mark.parametrize("now", [None, 50.0, 100.0, 160.0, 1000.0])
def test_score_at_equals_score_of_decayed(now: float | None) -> None:
    s = stats(ewma_cost=0.01, ewma_success=0.4, ewma_refusal=0.3, ewma_latency=1.0,
              last_update=100.0)
    assert score_at(s, now, 60.0, 0.3) == pytest.approx(score(decay(s, now, 60.0), 0.3))


# ---- strategies -------------------------------------------------------------------------------

def pick(strategy: str, st: Mapping[str, DeploymentStats] | None = None, *, counter: int = 0,
         seed: int = 1, cands: Sequence[Candidate] = ABC, **settings: float) -> Candidate:
    return choose(strategy, cands, st or {}, counter=counter, rng=random.Random(seed),
                  settings=RoutingSettings(**settings))  # type: ignore[arg-type]


def test_round_robin() -> None:
    assert [pick("round_robin", counter=i) for i in range(4)] == [A, B, C, A]


def test_weighted_follows_weights_and_skips_zero() -> None:
    rng = random.Random(7)
    counts = Counter(
        choose("weighted", ABC, {}, counter=0, rng=rng, settings=RoutingSettings()).provider
        for _ in range(4000)
    )
    assert counts["c"] == 0
    assert 2.6 < counts["b"] / counts["a"] < 3.4
    zero = (attrs.evolve(A, weight=0), attrs.evolve(B, weight=0))
    assert {pick("weighted", cands=zero, seed=s).provider for s in range(20)} == {"a", "b"}


def test_lowest_latency_unknown_first_then_lowest() -> None:
    st = {A.deployment_id: stats(ewma_latency=0.5), B.deployment_id: stats(ewma_latency=0.2)}
    assert pick("lowest_latency", st) == C  # never measured → try it first
    st[C.deployment_id] = stats(ewma_latency=0.9)
    assert pick("lowest_latency", st) == B


def test_cheapest_and_fallback_chain() -> None:
    assert pick("cheapest") == B  # B and C both 2.0 per Mtok → tie → configuration order
    assert pick("cheapest", cands=(A, attrs.evolve(B, output_per_mtok=2.0), C)) == C
    assert pick("fallback_chain") == B
    assert fallback_order(ABC) == [B, C, A]


def test_errors() -> None:
    with pytest.raises(NoCandidates):
        pick("round_robin", cands=())
    with pytest.raises(ValueError, match="unknown routing strategy 'fastest'"):
        pick("fastest")
    assert set(STRATEGIES) == {"round_robin", "weighted", "lowest_latency", "cheapest",
                               "fallback_chain", "outcome_aware"}


def test_outcome_aware_warmup_is_round_robin() -> None:
    st = {A.deployment_id: stats(samples=5), B.deployment_id: stats(samples=4),
          C.deployment_id: stats(samples=9)}
    assert [pick("outcome_aware", st, counter=i) for i in range(6)] == [A, B, C] * 2


def test_outcome_aware_best_score_and_exploration() -> None:
    st = {A.deployment_id: stats(ewma_cost=0.01),  # score 0.01: best
          B.deployment_id: stats(ewma_cost=0.01, ewma_success=0.5, ewma_refusal=0.5),  # 0.03
          C.deployment_id: stats(ewma_cost=0.02)}  # 0.02
    rng = random.Random(3)
    settings = RoutingSettings(explore_rate=0.1)
    n = 20000
    counts = Counter(choose("outcome_aware", ABC, st, counter=i, rng=rng, settings=settings)
                     for i in range(n))
    # 10% exploration split by best/score: B 1/3 : C 1/2 → 4% and 6%
    assert counts[A] / n == pytest.approx(0.90, abs=0.01)
    assert counts[B] / n == pytest.approx(0.04, abs=0.006)
    assert counts[C] / n == pytest.approx(0.06, abs=0.006)
    assert pick("outcome_aware", st, explore_rate=0.0) == A


def test_exploration_still_probes_never_succeeded() -> None:
    st = {A.deployment_id: stats(ewma_cost=0.01), B.deployment_id: stats(ewma_cost=0.04),
          C.deployment_id: stats(ewma_cost=0.0, successes=0)}
    rng = random.Random(8)
    settings = RoutingSettings(explore_rate=0.5)
    counts = Counter(choose("outcome_aware", ABC, st, counter=i, rng=rng, settings=settings)
                     for i in range(4000))
    assert counts[B] == pytest.approx(counts[C], rel=0.15)  # inf gets the smallest finite weight


def test_outcome_aware_near_ties_share_traffic() -> None:
    st = {A.deployment_id: stats(ewma_cost=0.0100), B.deployment_id: stats(ewma_cost=0.0102),
          C.deployment_id: stats(ewma_cost=0.05)}
    got = [pick("outcome_aware", st, counter=i, explore_rate=0.0) for i in range(4)]
    assert got == [A, B, A, B]


def test_outcome_aware_all_failing_spreads() -> None:
    st = {c.deployment_id: stats(successes=0, ewma_cost=0.0) for c in ABC}
    assert [pick("outcome_aware", st, counter=i) for i in range(3)] == list(ABC)


def test_seeded_rng_is_deterministic() -> None:
    st = {c.deployment_id: stats(ewma_cost=0.01 * (i + 1)) for i, c in enumerate(ABC)}

    def run(seed: int) -> list[str]:
        r = Router(RoutingSettings(explore_rate=0.3), random.Random(seed))
        return [r.pick("m", "outcome_aware", ABC, st).provider for _ in range(200)]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_router_counts_per_model() -> None:
    r = Router()
    assert [r.pick("x", "round_robin", ABC, {}).provider for _ in range(2)] == ["a", "b"]
    assert r.pick("y", "round_robin", ABC, {}).provider == "a"


def test_share_window_slides() -> None:
    w = ShareWindow(window=4)
    for dep in ["a", "a", "a", "a", "b", "b"]:
        w.note("m", dep)
    assert w.shares("m") == {"a": 0.5, "b": 0.5}
    assert w.total("m") == 4 and w.shares("other") == {}


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="explore_rate must be between 0 and 1"):
        RoutingSettings(explore_rate=1.5)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        RoutingSettings(alpha=0.0)
    with pytest.raises(ValueError, match="decay_s must be > 0"):
        RoutingSettings(decay_s=0)


# ---- closed loop: convergence and recovery (pure simulation, explicit clock) -------------------

Behaviour = Callable[[str, random.Random], Outcome]


def provider(refuse_rate: float, cost: float = 0.01) -> Behaviour:
    def serve(dep: str, rng: random.Random) -> Outcome:
        refused = rng.random() < refuse_rate  # refused: not a success, prompt tokens still billed
        return Outcome("r", dep, "m", success=not refused, refused=refused,
                       cost_usd=0.3 * cost if refused else cost, latency_s=0.3)
    return serve


def simulate(
    behaviours: dict[str, Behaviour], n: int, st: dict[str, DeploymentStats], *,
    settings: RoutingSettings, router: Router, t0: float = 0.0, dt: float = 1.0,
) -> tuple[list[str], float]:
    cands = [Candidate(d, d, d) for d in behaviours]
    outcome_rng = random.Random(99)
    chosen: list[str] = []
    now = t0
    for _ in range(n):
        now += dt
        c = router.pick("m", "outcome_aware", cands, st, now)
        chosen.append(c.deployment_id)
        o = behaviours[c.deployment_id](c.deployment_id, outcome_rng)
        st[c.deployment_id] = update_stats(
            decay(st.get(c.deployment_id, DeploymentStats()), now, settings.decay_s),
            o, settings.alpha, now)
    return chosen, now


def test_convergence_to_healthy_deployment() -> None:
    settings = RoutingSettings()
    router = Router(settings, random.Random(5))
    st: dict[str, DeploymentStats] = {}
    chosen, _ = simulate({"good": provider(0.0), "bad": provider(0.5)}, 1000, st,
                         settings=settings, router=router)
    assert chosen[:10] == ["good", "bad"] * 5  # warm-up round-robin
    after = Counter(chosen[10:])
    assert after["good"] / sum(after.values()) >= 0.85
    assert after["bad"] > 0  # exploration keeps measuring it


def test_recovery_via_exploration() -> None:
    settings = RoutingSettings()
    router = Router(settings, random.Random(11))
    st: dict[str, DeploymentStats] = {}
    # the bad one is cheaper: once healthy it should win the traffic back
    simulate({"good": provider(0.0, 0.02), "bad": provider(0.5, 0.015)}, 500, st,
             settings=settings, router=router)
    assert score(st["bad"]) > score(st["good"])
    chosen, _ = simulate({"good": provider(0.0, 0.02), "bad": provider(0.0, 0.015)}, 800, st,
                         settings=settings, router=router, t0=500.0)
    first_win = next(i for i in range(len(chosen) - 50)
                     if Counter(chosen[i:i + 50])["bad"] >= 40)
    assert first_win < 200
    assert Counter(chosen[-200:])["bad"] / 200 >= 0.85


@pytest.mark.parametrize("decay_s", [60.0, 1e12])
def test_recovery_via_decay_without_exploration(decay_s: float) -> None:
    settings = RoutingSettings(explore_rate=0.0, decay_s=decay_s)
    router = Router(settings, random.Random(2))
    st: dict[str, DeploymentStats] = {}
    # a bad burst of 100 requests within 10 s: "bad" is demoted right after warm-up
    first, now = simulate({"good": provider(0.0), "bad": provider(0.6)}, 100, st,
                          settings=settings, router=router, dt=0.1)
    assert Counter(first[20:])["bad"] == 0
    # equal prices, no exploration: only the decay of stale stats can bring "bad" back
    chosen, _ = simulate({"good": provider(0.0), "bad": provider(0.0)}, 600, st,
                         settings=settings, router=router, t0=now)
    if decay_s < 1e6:
        assert "bad" in chosen[:300]
        assert Counter(chosen[-100:])["bad"] >= 30
    else:
        assert "bad" not in chosen  # without decay it stays banished
