"""Cooldowns, backoff bounds, compression, config validation, client-facing reports."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio

from sbactor.resilience import (
    Attempt,
    CooldownTracker,
    Failure,
    FailureClass,
    GiveUp,
    ResilienceConfig,
    RetryPolicyConfig,
    attempts_detail,
    compress_messages,
    estimate_tokens,
    give_up_error,
    retry_delay,
    stream_error_chunk,
    stream_error_sse,
)
from sbactor.resilience.compress import overflow_numbers

F = FailureClass


# -- cooldown ------------------------------------------------------------------------------------

def test_cooldown_after_allowed_fails_within_window() -> None:
    t = CooldownTracker(allowed_fails=3, fail_window_s=60, cooldown_s=30)
    assert not t.record_failure("d1", F.SERVER_ERROR, 0)
    assert not t.record_failure("d1", F.TIMEOUT, 10)
    assert not t.is_cooling("d1", 11)
    assert t.record_failure("d1", F.CONNECTION, 20)
    assert t.is_cooling("d1", 20) and t.is_cooling("d1", 49.9)
    assert not t.is_cooling("d1", 50.0)
    assert not t.is_cooling("d2", 20)
    snap = t.snapshot(25)
    assert snap["d1"]["cooling"] and snap["d1"]["cooldown_remaining_s"] == 25
    assert t.statistics(25).cooling == 1 and t.statistics().cooldowns_started == 1


def test_failures_outside_the_window_do_not_count() -> None:
    t = CooldownTracker(allowed_fails=3, fail_window_s=60, cooldown_s=30)
    t.record_failure("d", F.SERVER_ERROR, 0)
    t.record_failure("d", F.SERVER_ERROR, 50)
    assert not t.record_failure("d", F.SERVER_ERROR, 100)  # the one at 0 expired
    assert not t.is_cooling("d", 100)
    assert t.record_failure("d", F.SERVER_ERROR, 105)
    assert t.is_cooling("d", 106)


def test_only_health_classes_count_and_success_resets() -> None:
    t = CooldownTracker(allowed_fails=2, fail_window_s=60, cooldown_s=30, max_retry_after_s=60)
    for cls in (F.BAD_REQUEST, F.CONTEXT_WINDOW, F.CONTENT_POLICY, F.AUTH, F.NOT_FOUND):
        assert not t.record_failure("d", cls, 1)
        assert not t.record_failure("d", cls, 2)
    assert not t.is_cooling("d", 3)
    t.record_failure("d", F.RATE_LIMIT, 4)
    t.record_success("d", 5)
    assert not t.record_failure("d", F.RATE_LIMIT, 6)
    assert t.record_failure("d", F.RATE_LIMIT, 7, retry_after_s=45)
    assert t.cooling_remaining_s("d", 7) == 45  # Retry-After longer than cooldown_s
    assert t.statistics().failures_ignored == 10


async def test_cooldown_on_the_trio_clock(autojump_clock: trio.abc.Clock) -> None:
    t = CooldownTracker.from_config(ResilienceConfig(allowed_fails=2, cooldown_s=30))
    t.record_failure("d", F.TIMEOUT, trio.current_time())
    await trio.sleep(1)
    assert t.record_failure("d", F.TIMEOUT, trio.current_time())
    await trio.sleep(29.5)
    assert t.is_cooling("d", trio.current_time())
    await trio.sleep(1)
    assert not t.is_cooling("d", trio.current_time())


# -- backoff -------------------------------------------------------------------------------------

def test_full_jitter_bounds() -> None:
    rng = random.Random(0)
    for n in range(1, 12):
        ceiling = min(8.0, 0.25 * 2 ** (n - 1))
        draws = [retry_delay(n, base_s=0.25, max_s=8.0, rng=rng, remaining_s=100).delay_s
                 for _ in range(200)]
        assert all(0 <= d <= ceiling for d in draws)
        assert max(draws) > ceiling * 0.8  # really spread over the range


def test_retry_after_honoured_and_capped_and_deadline() -> None:
    rng = random.Random(0)
    d = retry_delay(1, base_s=0.25, max_s=8, rng=rng, remaining_s=100, retry_after_s=7,
                    max_retry_after_s=30)
    assert (d.delay_s, d.source, d.clipped) == (7, "retry_after", False)
    d = retry_delay(1, base_s=0.25, max_s=8, rng=rng, remaining_s=100, retry_after_s=300,
                    max_retry_after_s=30)
    assert d.delay_s == 30
    d = retry_delay(1, base_s=0.25, max_s=8, rng=rng, remaining_s=2, retry_after_s=7)
    assert d.delay_s == 2 and d.clipped and d.wanted_s == 7


# -- compression ---------------------------------------------------------------------------------

def msgs(*roles: str) -> list[dict[str, Any]]:
    return [{"role": r, "content": f"{r}{i} " + "z" * 396} for i, r in enumerate(roles)]


def test_compress_drops_oldest_turns_keeps_system_and_last_user() -> None:
    m = msgs("system", "user", "assistant", "user", "assistant", "user")
    out = compress_messages(m, estimate_tokens(m) - 150)
    assert out is not None
    assert [x["content"][:10] for x in out] == [m[0]["content"][:10], m[3]["content"][:10],
                                                m[4]["content"][:10], m[5]["content"][:10]]


def test_compress_keeps_tool_results_with_their_call() -> None:
    m: list[dict[str, Any]] = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u0 " + "a" * 800},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "t1", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "r" * 800},
        {"role": "assistant", "content": "done"},
        {"role": "user", "content": "u1"},
    ]
    out = compress_messages(m, 50)
    assert out is not None and [x["role"] for x in out] == ["system", "user"]
    assert not any(x["role"] == "tool" for x in out)


def test_compress_returns_none_when_it_cannot_fit() -> None:
    m = msgs("system", "user")
    assert compress_messages(m, 10) is None
    assert compress_messages([{"role": "assistant", "content": "x"}], 1000) is None
    assert compress_messages(msgs("system", "user"), 10_000, min_drop=1) is None


def test_compress_custom_estimator_and_min_drop() -> None:
    m = msgs("user", "assistant", "user", "assistant", "user")
    out = compress_messages(m, 10_000, lambda xs: len(xs), min_drop=1)
    assert out is not None and len(out) == 3


def test_overflow_numbers() -> None:
    assert overflow_numbers("This model's maximum context length is 8192 tokens. However, your "
                            "messages resulted in 9000 tokens.") == (9000, 8192)
    assert overflow_numbers("prompt is too long: 210345 tokens > 200000 maximum") == (
        210345, 200000)
    assert overflow_numbers("nope") is None


# -- config --------------------------------------------------------------------------------------

def test_config_defaults() -> None:
    cfg = ResilienceConfig()
    assert cfg.retry_policy.retries_for(F.RATE_LIMIT) == 3
    assert cfg.retry_policy.retries_for(F.AUTH) == 0
    assert (cfg.backoff_base_s, cfg.backoff_max_s, cfg.max_retry_after_s) == (0.25, 8, 30)
    assert (cfg.request_deadline_s, cfg.allowed_fails, cfg.cooldown_s) == (120, 3, 30)
    assert cfg.on_context_window == "fallback"


@pytest.mark.parametrize(("kwargs", "text"), [
    ({"backoff_base_s": 0}, "must be > 0"),
    ({"request_deadline_s": -1}, "must be > 0"),
    ({"backoff_base_s": 10, "backoff_max_s": 1}, "backoff_max_s"),
    ({"cooldown_s": -5}, ">= 0"),
])
def test_config_validation(kwargs: dict[str, Any], text: str) -> None:
    with pytest.raises(ValueError, match=text):
        ResilienceConfig(**kwargs)


def test_retry_count_validation() -> None:
    with pytest.raises(ValueError, match="whole number"):
        RetryPolicyConfig(rate_limit=-1)
    with pytest.raises(ValueError, match="whole number"):
        RetryPolicyConfig(timeout=1000)


# -- reports -------------------------------------------------------------------------------------

def attempt(model: str, cls: FailureClass | None) -> Attempt:
    return Attempt(model, f"{model}-1", "p", cls, 429 if cls else 200, None, 0.0, "first", 0.0)


def test_give_up_error_is_precise() -> None:
    failure = Failure(F.RATE_LIMIT, 429, "Rate limit reached", "rate_limit_exceeded", 3.0)
    err = give_up_error(GiveUp(failure, "rate_limit: retries exhausted (3 of 3)"),
                        [attempt("gpt-4o", F.RATE_LIMIT)] * 4)
    assert err.status == 429 and err.retry_after_s == 3.0
    assert "4 attempts" in err.message and "gpt-4o" in err.message
    assert "Traceback" not in err.message
    assert err.body()["error"]["type"] == "rate_limit_error"


def test_stream_error_chunk_shape() -> None:
    failure = Failure(F.CONNECTION, None, "peer closed connection")
    chunk = stream_error_chunk(failure, model="gpt-4o", completion_id="c1", created=1)
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"] == []
    assert chunk["error"]["code"] == "upstream_unreachable"
    raw = stream_error_sse(failure, model="gpt-4o", completion_id="c1", created=1)
    assert raw.startswith(b"data: {") and raw.endswith(b"\n\n") and b"[DONE]" not in raw


def test_attempts_detail() -> None:
    line = attempts_detail([attempt("a", F.RATE_LIMIT), attempt("a", None)])
    assert line == "a@a-1:rate_limit+0.00s, a@a-1:ok+0.00s"
