"""The retry/fallback planner: per-class retries, typed fallbacks, no cycles, deadline, compress."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Literal

import pytest
import trio

from sbactor.resilience import (
    AttemptPlanner,
    Done,
    Failure,
    FailureClass,
    FallbackEntry,
    FallbackTable,
    GiveUp,
    PlannerError,
    ResilienceConfig,
    RetryPolicyConfig,
    Try,
    attempts_header,
    give_up_error,
)

F = FailureClass
TABLE = FallbackTable({
    "a": FallbackEntry(fallbacks=("b", "c"), context_window_fallbacks=("big",),
                       content_policy_fallbacks=("other",), context_window=1000),
    "b": FallbackEntry(fallbacks=("a", "d")),  # points back at a: must not cycle
    "c": FallbackEntry(),
    "d": FallbackEntry(fallbacks=("b",)),
    "big": FallbackEntry(fallbacks=("a",)),
    "other": FallbackEntry(content_policy_fallbacks=("a",)),
})


def planner(config: ResilienceConfig | None = None, model: str = "a", **kw: Any) -> AttemptPlanner:
    return AttemptPlanner(config=config or ResilienceConfig(), model=model, fallbacks=TABLE,
                          rng=random.Random(7), started_at=0.0, **kw)


Upstream = Callable[[str, str, int], Failure | None]


def drive(plan: AttemptPlanner, upstream: Upstream, *, attempt_s: float = 0.0,
          deployments: dict[str, str] | None = None) -> tuple[Done | GiveUp, float]:
    """Run the loop the way the gateway does, on a fake clock: returns the end and the time."""
    now = 0.0
    n = 0
    while True:
        step = plan.next_step(now)
        if not isinstance(step, Try):
            return step, now
        now += step.delay_s + attempt_s
        dep = step.prefer_deployment or (deployments or {}).get(step.model, f"{step.model}-1")
        plan.record(dep, step.model, upstream(step.model, dep, n), now, provider="p-" + dep)
        n += 1


def fail(cls: FailureClass, status: int | None = 500, retry_after: float | None = None,
         message: str = "x") -> Failure:
    return Failure(cls, status, message, None, retry_after)


@pytest.mark.parametrize(("cls", "retries"), [
    (F.RATE_LIMIT, 3), (F.TIMEOUT, 2), (F.SERVER_ERROR, 2), (F.CONNECTION, 2),
    (F.AUTH, 0), (F.BAD_REQUEST, 0), (F.CONTEXT_WINDOW, 0), (F.CONTENT_POLICY, 0),
    (F.NOT_FOUND, 0), (F.UNKNOWN, 0),
])
def test_default_retry_counts_per_class(cls: FailureClass, retries: int) -> None:
    table = FallbackTable({"solo": FallbackEntry()})
    plan = AttemptPlanner(config=ResilienceConfig(), model="solo", fallbacks=table,
                          rng=random.Random(1), started_at=0.0)
    end, _ = drive(plan, lambda m, d, n: fail(cls))
    assert isinstance(end, GiveUp) and end.failure.cls is cls
    assert len(plan.attempts) == 1 + retries
    assert all(a.model == "solo" for a in plan.attempts)


def test_custom_policy_counts() -> None:
    cfg = ResilienceConfig(retry_policy=RetryPolicyConfig(rate_limit=5, auth=1))
    plan = AttemptPlanner(config=cfg, model="solo", fallbacks=FallbackTable(),
                          rng=random.Random(1), started_at=0.0)
    drive(plan, lambda m, d, n: fail(F.RATE_LIMIT, 429))
    assert len(plan.attempts) == 6


def test_rate_limit_then_success_two_attempts_honours_retry_after() -> None:
    plan = planner()
    end, now = drive(plan, lambda m, d, n: fail(F.RATE_LIMIT, 429, 1.5) if n == 0 else None)
    assert isinstance(end, Done)
    assert [a.cls for a in plan.attempts] == [F.RATE_LIMIT, None]
    assert plan.attempts[1].delay_s == 1.5 and plan.attempts[1].reason == "retry"
    assert plan.attempts[1].deployment == plan.attempts[0].deployment  # same deployment
    assert now == 1.5 and attempts_header(plan.attempts) == "2"


def test_retry_after_capped() -> None:
    plan = planner(ResilienceConfig(max_retry_after_s=5))
    drive(plan, lambda m, d, n: fail(F.RATE_LIMIT, 429, 600) if n == 0 else None)
    assert plan.attempts[1].delay_s == 5


def test_class_picks_the_fallback_list() -> None:
    for cls, target, reason in [(F.CONTEXT_WINDOW, "big", "context_window_fallback"),
                                (F.CONTENT_POLICY, "other", "content_policy_fallback"),
                                (F.AUTH, "b", "fallback"), (F.NOT_FOUND, "b", "fallback")]:
        plan = planner()
        def upstream(m: str, d: str, n: int, cls: FailureClass = cls) -> Failure | None:
            return fail(cls, 400) if m == "a" else None

        end, _ = drive(plan, upstream)
        assert isinstance(end, Done), cls
        assert [a.model for a in plan.attempts] == ["a", target], cls
        assert plan.attempts[1].reason == reason


def test_bad_request_never_falls_back() -> None:
    plan = planner()
    end, _ = drive(plan, lambda m, d, n: fail(F.BAD_REQUEST, 400))
    assert isinstance(end, GiveUp) and len(plan.attempts) == 1
    err = give_up_error(end, plan.attempts)
    assert err.status == 400 and "invalid" in err.message


def test_exhausted_retries_go_to_general_fallbacks_then_give_up() -> None:
    plan = planner()
    end, _ = drive(plan, lambda m, d, n: fail(F.SERVER_ERROR, 503))
    assert isinstance(end, GiveUp)
    models = [a.model for a in plan.attempts]
    # a: 1+2, then b: 1+2, then d (b's list; a already tried) 1+2, then c (a's list) 1+2
    assert models == ["a"] * 3 + ["b"] * 3 + ["d"] * 3 + ["c"] * 3
    assert "no fallback left" in end.reason


def test_no_cycles_and_no_retry_cycle_restart() -> None:
    """a→b→a would loop (b lists a); a's retries must not restart when reached via b."""
    plan = planner()
    drive(plan, lambda m, d, n: fail(F.TIMEOUT, None))
    models = [a.model for a in plan.attempts]
    assert models.count("a") == 3  # first try + 2 retries, never again
    for name in set(models):
        runs = [i for i, m in enumerate(models) if m == name]
        assert runs == list(range(runs[0], runs[0] + len(runs)))  # one contiguous block each


def test_content_policy_fallback_cycle_other_to_a() -> None:
    plan = planner()
    end, _ = drive(plan, lambda m, d, n: fail(F.CONTENT_POLICY, 200))
    assert [a.model for a in plan.attempts] == ["a", "other"]
    assert isinstance(end, GiveUp) and end.usable_attempt == 1  # serve the refusal as is


def test_auth_excludes_the_provider_and_deployment() -> None:
    plan = planner()
    step = plan.next_step(0.0)
    assert isinstance(step, Try)
    plan.record("a-1", "a", fail(F.AUTH, 401), 0.1, provider="openai")
    step = plan.next_step(0.1)
    assert isinstance(step, Try) and step.model == "b" and step.delay_s == 0
    assert "a-1" in step.exclude_deployments and "openai" in step.exclude_providers
    plan.record("b-1", "b", None, 0.2)
    end = plan.next_step(0.2)
    assert isinstance(end, Done) and end.attempt.model == "b"
    err_plan = planner()
    drive(err_plan, lambda m, d, n: fail(F.AUTH, 401))
    final = err_plan.next_step(99)
    assert isinstance(final, GiveUp)
    assert give_up_error(final, err_plan.attempts).status == 502


def test_deadline_bounds_total_time() -> None:
    cfg = ResilienceConfig(request_deadline_s=10, retry_policy=RetryPolicyConfig(rate_limit=20))
    plan = AttemptPlanner(config=cfg, model="solo", fallbacks=FallbackTable(),
                          rng=random.Random(3), started_at=0.0)
    end, now = drive(plan, lambda m, d, n: fail(F.RATE_LIMIT, 429, 3), attempt_s=0.5)
    assert isinstance(end, GiveUp)
    assert now <= 10.0
    assert len(plan.attempts) < 21


def test_deadline_retry_after_too_long_moves_to_fallback() -> None:
    plan = planner(ResilienceConfig(request_deadline_s=5))
    end, now = drive(plan, lambda m, d, n: fail(F.RATE_LIMIT, 429, 20) if m == "a" else None)
    assert isinstance(end, Done) and end.attempt.model == "b" and now < 5


def test_try_timeout_shrinks_with_the_deadline() -> None:
    plan = planner(ResilienceConfig(request_deadline_s=30))
    first = plan.next_step(0.0)
    assert isinstance(first, Try) and first.timeout_s == 30
    plan.record("a-1", "a", fail(F.RATE_LIMIT, 429, 2), 10.0)
    retry = plan.next_step(10.0)
    assert isinstance(retry, Try) and retry.timeout_s == pytest.approx(18.0)


def test_out_of_order_use_is_an_error() -> None:
    plan = planner()
    with pytest.raises(PlannerError):
        plan.record("x", "a", None, 0.0)
    plan.next_step(0.0)
    with pytest.raises(PlannerError):
        plan.next_step(0.0)


def test_disabled_is_one_attempt() -> None:
    plan = planner(ResilienceConfig(enabled=False))
    end, _ = drive(plan, lambda m, d, n: fail(F.RATE_LIMIT, 429))
    assert isinstance(end, GiveUp) and len(plan.attempts) == 1


def test_unroutable_model_moves_to_fallback() -> None:
    plan = planner()
    plan.next_step(0.0)
    plan.record_unroutable("a", 0.0, "all deployments cooling down")
    step = plan.next_step(0.0)
    assert isinstance(step, Try) and step.model == "b"
    plan.record_unroutable("b", 0.0)
    plan.next_step(0.0)
    plan.record_unroutable("d", 0.0)
    plan.next_step(0.0)
    plan.record_unroutable("c", 0.0)
    end = plan.next_step(0.0)
    assert isinstance(end, GiveUp)
    assert give_up_error(end, plan.attempts).status == 503


def conversation(turns: int) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "be brief"}]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"question {i} " + "x" * 400},
                 {"role": "assistant", "content": f"answer {i} " + "y" * 400}]
    msgs.append({"role": "user", "content": "final question"})
    return msgs


def test_compress_and_retry_once_when_no_context_fallback() -> None:
    table = FallbackTable({"m": FallbackEntry(context_window=1000)})
    msgs = conversation(10)  # ~2000 estimated tokens
    plan = AttemptPlanner(config=ResilienceConfig(on_context_window="compress"), model="m",
                          fallbacks=table, rng=random.Random(1), started_at=0.0, messages=msgs)
    seen: list[Any] = []

    def upstream(m: str, d: str, n: int) -> Failure | None:
        return fail(F.CONTEXT_WINDOW, 400) if n == 0 else None

    now = 0.0
    while True:
        step = plan.next_step(now)
        if not isinstance(step, Try):
            break
        seen.append(step.messages)
        plan.record("m-1", step.model, upstream(step.model, "m-1", len(seen) - 1), now)
    assert isinstance(step, Done)
    assert [a.reason for a in plan.attempts] == ["first", "compressed"]
    compressed = seen[1]
    assert compressed is not None and len(compressed) < len(msgs)
    assert compressed[0]["role"] == "system" and compressed[-1]["content"] == "final question"
    assert plan.tags == ("context_compressed",)
    assert plan.compression is not None and plan.compression["dropped_messages"] > 0


def test_compress_only_once_and_fallback_mode_does_not_compress() -> None:
    table = FallbackTable({"m": FallbackEntry(context_window=1000)})
    modes: list[tuple[Literal["fallback", "compress", "fail"], int]] = [
        ("compress", 2), ("fallback", 1), ("fail", 1)]
    for mode, attempts in modes:
        plan = AttemptPlanner(config=ResilienceConfig(on_context_window=mode), model="m",
                              fallbacks=table, rng=random.Random(1), started_at=0.0,
                              messages=conversation(10))
        end, _ = drive(plan, lambda m, d, n: fail(F.CONTEXT_WINDOW, 400))
        assert isinstance(end, GiveUp) and len(plan.attempts) == attempts, mode


def test_context_fallback_preferred_over_compression() -> None:
    plan = planner(ResilienceConfig(on_context_window="compress"), messages=conversation(10))
    end, _ = drive(plan, lambda m, d, n: fail(F.CONTEXT_WINDOW, 400) if m == "a" else None)
    assert isinstance(end, Done) and end.attempt.model == "big" and plan.tags == ()


async def test_retries_on_the_trio_clock(autojump_clock: trio.abc.Clock) -> None:
    """The loop as the gateway runs it: real trio.sleep for backoff, time jumps instantly."""
    start = trio.current_time()
    plan = AttemptPlanner(config=ResilienceConfig(request_deadline_s=60), model="solo",
                          fallbacks=FallbackTable(), rng=random.Random(5), started_at=start)
    calls = 0
    while True:
        step = plan.next_step(trio.current_time())
        if not isinstance(step, Try):
            break
        await trio.sleep(step.delay_s)
        calls += 1
        failure = fail(F.RATE_LIMIT, 429, 4.0) if calls <= 3 else None
        plan.record("solo-1", step.model, failure, trio.current_time())
    assert isinstance(step, Done) and calls == 4
    assert trio.current_time() - start == pytest.approx(12.0)


async def test_deadline_on_the_trio_clock(autojump_clock: trio.abc.Clock) -> None:
    start = trio.current_time()
    cfg = ResilienceConfig(request_deadline_s=20, retry_policy=RetryPolicyConfig(timeout=20))
    plan = AttemptPlanner(config=cfg, model="solo", fallbacks=FallbackTable(),
                          rng=random.Random(5), started_at=start)
    while True:
        step = plan.next_step(trio.current_time())
        if not isinstance(step, Try):
            break
        await trio.sleep(step.delay_s)
        with trio.move_on_after(min(step.timeout_s, 8.0)):
            await trio.sleep_forever()  # a hung upstream: the attempt times out
        plan.record("solo-1", step.model, fail(F.TIMEOUT, None), trio.current_time())
    assert isinstance(step, GiveUp)
    assert trio.current_time() - start <= 20.0 + 1e-9
