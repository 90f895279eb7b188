"""Policy evaluation latency: p50/p99 per request for a 5-clause expression.

Rows: the gateway path (``CompiledPolicy.evaluate``: activation conversion + fast evaluation +
action parsing), its parts, and stock cel-python (``json_to_cel`` + ``CompiledRunner.evaluate``)
for comparison. Target: gateway path p50 <= 100 us.

    /work/venv/bin/python benchmarks/bench_policy.py [--n 20000]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from typing import Any

import _results
import celpy

from sbactor.policy import CompiledPolicy, PolicyConfig, build_activation, parse_actions
from sbactor.policy.activation import to_cel

FIVE_CLAUSES = """
ai.guardrails.flagged_count >= 2 ? "block" :
ai.budget.fraction > 0.9 ? ["route_to:gpt-4o-mini", "audit:medium"] :
ai.principal.tier == "free" && ai.tokens.input_est > 4000 ? "route_to:gpt-4o-mini" :
"beta" in ai.principal.tags ? ["set_sink_tag:beta", "audit:low"] :
ai.guardrails.flagged ? "redact" : "allow"
"""

ACTIVATION = build_activation(
    surface="chat",
    model="gpt-4o",
    route={"model": "gpt-4o", "provider": "openai"},
    principal={"key_id": "k1", "user": "alice", "team": "research", "tier": "pro", "tags": ["x"]},
    guardrails={
        "flagged": True,
        "flagged_count": 1,
        "labels": ["pii"],
        "verdicts": [
            {"detector": "pii", "label": "email", "flagged": True, "score": 0.97},
            {"detector": "secrets", "label": "", "flagged": False, "score": 0.0},
            {"detector": "prompt_injection", "label": "", "flagged": False, "score": 0.1},
        ],
    },
    budget={"fraction": 0.42, "exceeded": False, "forecast_fraction": 0.55},
    tokens={"input_est": 812, "max_output": 1024},
    request={"stream": True, "tools": False},
)


def measure(name: str, fn: Callable[[], Any], n: int) -> dict[str, Any]:
    for _ in range(min(1000, n)):
        fn()
    samples = []
    for i in range(1, n + 1):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
        _results.progress(f"{name:<44}", i, n)
    samples.sort()
    return {"path": name, "p50_us": samples[n // 2] / 1000, "p99_us": samples[int(n * 0.99)] / 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="evaluations per row (stock: n/4)")
    args = parser.parse_args()
    n = args.n
    started = _results.start()
    logging.getLogger("celpy").setLevel(logging.CRITICAL)

    policy = CompiledPolicy.compile(
        PolicyConfig(expression=FIVE_CLAUSES), {"gpt-4o", "gpt-4o-mini"}
    )
    assert policy.statistics().fast_path
    outcome = policy.evaluate(ACTIVATION)
    assert outcome.error is None and outcome.decision.redact, outcome
    context = to_cel(ACTIVATION)
    runner = policy._runner
    value = runner.evaluate(context)

    rows = [
        measure("gateway: evaluate() total", lambda: policy.evaluate(ACTIVATION), n),
        measure("  part: to_cel(activation)", lambda: to_cel(ACTIVATION), n),
        measure("  part: fast eval (pre-converted)", lambda: policy._run(context), n),
        measure("  part: parse_actions", lambda: parse_actions(value), n),
        measure(
            "stock cel-python: json_to_cel + runner",
            lambda: runner.evaluate(celpy.json_to_cel(ACTIVATION)),  # type: ignore[arg-type]
            n // 4,
        ),
        measure("  part: celpy.json_to_cel", lambda: celpy.json_to_cel(ACTIVATION), n // 4),
    ]
    print(f"policy evaluation, 5-clause expression, n={n} (stock rows n={n // 4})")
    print(f"{'path':<44} {'p50 us':>9} {'p99 us':>9}")
    for r in rows:
        print(f"{r['path']:<44} {r['p50_us']:9.1f} {r['p99_us']:9.1f}")
    total = rows[0]["p50_us"]
    stock = rows[4]["p50_us"]
    print(
        f"target p50 <= 100 us: {'met' if total <= 100 else 'MISSED'} ({total:.1f} us); "
        f"stock/gateway p50 ratio {stock / total:.1f}x"
    )
    summary = {"target_p50_met": total <= 100, "stock_vs_gateway_p50_x": stock / total}
    _results.write(__file__, args, rows, started, keys=["path"], summary=summary)


if __name__ == "__main__":
    main()
