"""Pure budget core: windows, estimates, scopes, reservations, soft landing, forecast, limits."""

from __future__ import annotations

import datetime as dt
import math
import uuid

import pytest

from sbactor.budget.book import _RECENT_RECONCILED, BudgetBook, Refused, Reserved
from sbactor.budget.config import (
    BudgetConfig,
    BudgetSettings,
    RateLimitConfig,
    SoftLandingConfig,
)
from sbactor.budget.estimate import estimate_tokens, output_cap, worst_case_cost
from sbactor.budget.ratelimit import RateLimiter
from sbactor.budget.scopes import RequestScopes
from sbactor.budget.shared_burn import SharedBurn
from sbactor.budget.windows import iso, window_end, window_length, window_start


def ts(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> float:
    return dt.datetime(y, mo, d, h, mi, s, tzinfo=dt.UTC).timestamp()


T0 = ts(2025, 3, 10, 12, 0, 0)
ALICE = RequestScopes(key_id="k1", user="alice", team="research", model="gpt-4o", tags=("beta",))
BOB = RequestScopes(key_id="k2", user="bob", team="sales", model="gpt-4o-mini")


# ---- windows ------------------------------------------------------------------------------


def test_calendar_windows_align_to_utc() -> None:
    now = ts(2025, 3, 10, 12, 34, 56) + 0.5
    assert window_start("minute", now) == ts(2025, 3, 10, 12, 34)
    assert window_end("minute", now) == ts(2025, 3, 10, 12, 35)
    assert window_start("hour", now) == ts(2025, 3, 10, 12)
    assert window_start("day", now) == ts(2025, 3, 10)
    assert window_end("day", now) == ts(2025, 3, 11)
    assert window_start("total", now) == -math.inf and window_end("total", now) == math.inf


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        (ts(2024, 2, 29, 23, 59, 59), ts(2024, 2, 1), ts(2024, 3, 1)),  # leap February
        (ts(2025, 2, 1), ts(2025, 2, 1), ts(2025, 3, 1)),  # exactly at the start
        (ts(2025, 12, 31, 23, 0), ts(2025, 12, 1), ts(2026, 1, 1)),  # year wrap
    ],
)
def test_month_boundaries(now: float, start: float, end: float) -> None:
    assert window_start("month", now) == start
    assert window_end("month", now) == end
    assert window_length("month", now) == end - start


def test_iso_formats_utc_and_never() -> None:
    assert iso(ts(2025, 1, 2, 3, 4, 5)) == "2025-01-02T03:04:05Z"
    assert iso(math.inf) is None and iso(None) is None


# ---- estimates ----------------------------------------------------------------------------


def test_estimate_tokens_counts_chars_and_overheads() -> None:
    msgs = [{"role": "system", "content": "x" * 40}, {"role": "user", "content": "y" * 41}]
    assert estimate_tokens(msgs) == 10 + 11 + 2 * 4 + 3
    parts = [{"role": "user", "content": [{"type": "text", "text": "abcd"}]}]
    assert estimate_tokens(parts) == 1 + 4 + 3
    assert estimate_tokens([]) == 3


def test_worst_case_cost_and_output_cap() -> None:
    assert worst_case_cost(1000, 500, 2.5, 10.0) == pytest.approx(0.0075)
    assert output_cap(256) == 256
    assert output_cap(None, model_default=1024) == 1024
    assert output_cap(None, context_window=8000, input_tokens=7000) == 1000
    assert output_cap(5000, context_window=8000, input_tokens=7000) == 1000
    assert output_cap(None) == 4096


# ---- config -------------------------------------------------------------------------------


def test_config_validation_messages() -> None:
    with pytest.raises(ValueError, match="max_cost_usd and/or max_tokens"):
        BudgetConfig(scope="team")
    with pytest.raises(ValueError, match=r"warn_at must be in \(0, 1\]"):
        SoftLandingConfig(warn_at=0.0)
    with pytest.raises(ValueError, match="must not be above"):
        SoftLandingConfig(warn_at=0.9, downgrade_at=0.5)
    with pytest.raises(ValueError, match="rpm and/or tpm"):
        RateLimitConfig(scope="key")
    with pytest.raises(ValueError, match="max_cost_usd must be > 0"):
        BudgetConfig(scope="global", max_cost_usd=0)
    assert BudgetConfig(scope="team", match="research", max_cost_usd=1).label == "team:research/day"


# ---- scopes -------------------------------------------------------------------------------


def test_scope_matching_per_value_and_shared_match() -> None:
    book = BudgetBook(
        [
            BudgetConfig(scope="team", max_cost_usd=1),
            BudgetConfig(scope="model", match="gpt-4o*", max_cost_usd=1),
            BudgetConfig(scope="global", max_cost_usd=10),
            BudgetConfig(scope="tag", match="beta", max_tokens=100),
            BudgetConfig(scope="user", match="carol", max_cost_usd=1),
        ]
    )
    a = {(c.budget, c.value) for c in book.counter_ids(ALICE)}
    assert a == {
        ("team/day", "research"),
        ("model:gpt-4o*/day", "gpt-4o*"),
        ("global/day", "*"),
        ("tag:beta/day", "beta"),
    }
    b = {(c.budget, c.value) for c in book.counter_ids(BOB)}
    assert ("team/day", "sales") in b and ("model:gpt-4o*/day", "gpt-4o*") in b
    assert not any(c[0].startswith("tag") for c in b)


# ---- reserve / reconcile ------------------------------------------------------------------


def test_reserve_is_all_or_nothing_across_scopes() -> None:
    book = BudgetBook(
        [
            BudgetConfig(scope="team", match="research", max_cost_usd=10.0),
            BudgetConfig(scope="user", match="alice", max_cost_usd=1.0),
        ]
    )
    assert isinstance(book.reserve("r1", ALICE, 0.8, 10, T0), Reserved)
    refused = book.reserve("r2", ALICE, 0.5, 10, T0)
    assert isinstance(refused, Refused)
    assert refused.budget == "user:alice/day" and refused.dimension == "cost"
    assert refused.resets_at == ts(2025, 3, 11)
    assert refused.retry_after_s == 1.0  # only the in-flight r1 is in the way
    assert "budget exceeded" in refused.message and "2025-03-11T00:00:00Z" in refused.message
    rows = {r["budget"]: r for r in book.admin(T0)}
    assert rows["team:research/day"]["reserved_usd"] == pytest.approx(0.8)  # r2 held nothing


def test_reconcile_swaps_reservation_for_actual_and_is_idempotent() -> None:
    book = BudgetBook([BudgetConfig(scope="team", max_cost_usd=1.0, max_tokens=1000)])
    book.reserve("r1", ALICE, 0.5, 600, T0)
    assert book.fraction(ALICE, T0) == pytest.approx(0.6)  # tokens are tighter
    assert book.reconcile("r1", 0.2, 100, T0 + 1)
    assert not book.reconcile("r1", 0.2, 100, T0 + 2)  # second reconcile ignored
    assert not book.reconcile("unknown", 5.0, 5, T0)  # unknown id: no-op
    assert book.fraction(ALICE, T0 + 2) == pytest.approx(0.2)
    assert book.statistics().reservations == 0


def test_reconciled_ids_are_remembered_in_a_bounded_window() -> None:
    book = BudgetBook([BudgetConfig(scope="global", max_cost_usd=1e9)])
    size = book._recent.nbytes()
    ids = [uuid.uuid4().hex for _ in range(_RECENT_RECONCILED + 5)]
    for rid in ids:
        book.reserve(rid, ALICE, 0.01, 1, T0)
        assert book.reconcile(rid, 0.01, 1, T0)
    assert len(book._recent) == _RECENT_RECONCILED and book._recent.nbytes() == size
    # inside the window a re-sent reconcile (even with scopes) is ignored ...
    assert not book.reconcile(ids[5], 0.01, 1, T0, scopes=ALICE)
    assert not book.reconcile(ids[-1], 0.01, 1, T0, scopes=ALICE)
    # ... the oldest ids have left it: with scopes, such a reconcile records spend again
    assert book.reconcile(ids[0], 0.01, 1, T0, scopes=ALICE)


def test_failure_and_cancel_release_with_zero_cost() -> None:
    book = BudgetBook([BudgetConfig(scope="global", max_cost_usd=1.0)])
    for i in range(10):
        assert isinstance(book.reserve(f"r{i}", ALICE, 0.1, 1, T0), Reserved)
    assert isinstance(book.reserve("r10", ALICE, 0.1, 1, T0), Refused)
    for i in range(10):
        book.reconcile(f"r{i}", 0.0, 0, T0)
    row = book.admin(T0)[0]
    assert row["reserved_usd"] == 0 and row["spent_usd"] == 0
    assert isinstance(book.reserve("r11", ALICE, 1.0, 1, T0), Reserved)


def test_unknown_id_with_scopes_records_spend() -> None:
    book = BudgetBook([BudgetConfig(scope="global", max_cost_usd=1.0)])
    assert book.reconcile("late", 0.3, 10, T0, scopes=ALICE)
    assert book.fraction(ALICE, T0) == pytest.approx(0.3)


def test_reservation_ttl_releases_lost_reconciles() -> None:
    book = BudgetBook(
        [BudgetConfig(scope="global", max_cost_usd=1.0)], BudgetSettings(reservation_ttl_s=60)
    )
    book.reserve("lost", ALICE, 1.0, 1, T0)
    assert book.expire(T0 + 59) == []
    assert book.expire(T0 + 60) == ["lost"]
    assert book.fraction(ALICE, T0 + 60) == 0.0


def test_request_larger_than_cap_never_fits() -> None:
    book = BudgetBook([BudgetConfig(scope="global", max_tokens=100, window="total")])
    refused = book.reserve("big", ALICE, 0.0, 101, T0)
    assert isinstance(refused, Refused)
    assert refused.retry_after_s is None and refused.resets_at is None


def test_calendar_window_really_resets_but_keeps_in_flight() -> None:
    book = BudgetBook([BudgetConfig(scope="global", window="hour", max_cost_usd=1.0)])
    book.reserve("a", ALICE, 0.6, 1, T0)
    book.reconcile("a", 0.6, 1, T0)
    book.reserve("b", ALICE, 0.3, 1, T0 + 3000)
    refused = book.reserve("c", ALICE, 0.5, 1, T0 + 3001)
    assert isinstance(refused, Refused) and refused.retry_after_s == pytest.approx(599)
    # next hour: spend resets, the in-flight reservation "b" still counts
    assert book.fraction(ALICE, T0 + 3600) == pytest.approx(0.3)
    assert isinstance(book.reserve("c", ALICE, 0.7, 1, T0 + 3600), Reserved)


def test_rolling_window_slides() -> None:
    book = BudgetBook([BudgetConfig(scope="global", window="hour", rolling=True, max_cost_usd=1)])
    for i, cost in enumerate([0.4, 0.4]):
        book.reserve(f"r{i}", ALICE, cost, 1, T0 + i * 1800)
        book.reconcile(f"r{i}", cost, 1, T0 + i * 1800)
    refused = book.reserve("x", ALICE, 0.4, 1, T0 + 1900)
    assert isinstance(refused, Refused)
    # the first 0.4 leaves the window one hour (+ one 60 s bucket) after it was spent
    assert refused.retry_after_s == pytest.approx(3600 + 60 - 1900)
    assert book.fraction(ALICE, T0 + 3600 + 59) == pytest.approx(0.8)
    assert book.fraction(ALICE, T0 + 3600 + 60) == pytest.approx(0.4)
    assert book.fraction(ALICE, T0 + 1800 + 3660) == 0.0


def test_total_window_never_resets() -> None:
    book = BudgetBook([BudgetConfig(scope="global", window="total", max_cost_usd=1)])
    book.reserve("a", ALICE, 0.5, 1, T0)
    book.reconcile("a", 0.5, 1, T0)
    assert book.fraction(ALICE, T0 + 10 * 365 * 86400) == pytest.approx(0.5)


# ---- soft landing and forecast ------------------------------------------------------------


def _landing_book(act_on: str = "current") -> BudgetBook:
    landing = SoftLandingConfig(
        warn_at=0.5,
        downgrade_at=0.8,
        downgrade_to="gpt-4o-mini",
        act_on=act_on,  # type: ignore[arg-type]
    )
    return BudgetBook(
        [BudgetConfig(scope="team", max_cost_usd=10.0, soft_landing=landing)],
        BudgetSettings(forecast_interval_s=60, forecast_alpha=0.5, forecast_min_samples=3),
    )


def _spend(book: BudgetBook, rid: str, cost: float, now: float) -> None:
    assert isinstance(book.reserve(rid, ALICE, cost, 1, now), Reserved)
    book.reconcile(rid, cost, 1, now)


def test_soft_landing_thresholds() -> None:
    book = _landing_book()
    assert not book.soft_landing(ALICE, T0).warn
    _spend(book, "a", 5.0, T0)
    d = book.soft_landing(ALICE, T0)
    assert d.warn and not d.downgrade and d.fraction == pytest.approx(0.5)
    assert d.message is not None and "50%" in d.message
    _spend(book, "b", 3.0, T0)
    d = book.soft_landing(ALICE, T0)
    assert d.warn and d.downgrade and d.downgrade_to == "gpt-4o-mini"
    assert d.budget == "team/day"
    # already on the downgrade target: warn only
    d2 = book.soft_landing(RequestScopes(team="research", model="gpt-4o-mini"), T0)
    assert d2.warn and not d2.downgrade
    # other teams are unaffected
    assert not book.soft_landing(BOB, T0).warn


def test_forecast_uses_burn_rate_ewma() -> None:
    book = _landing_book()
    start = ts(2025, 3, 10, 20, 0)  # 4 h before the day ends
    for minute in range(4):
        _spend(book, f"m{minute}", 0.06, start + minute * 60)  # $0.001/s
    now = start + 4 * 60
    views = book.views(ALICE, now)
    assert views[0].fraction == pytest.approx(0.024)
    remaining = window_end("day", now) - now
    assert views[0].forecast_fraction == pytest.approx((0.24 + 0.001 * remaining) / 10)
    # idle intervals decay the rate: an hour later the forecast is close to the spend
    later = book.views(ALICE, now + 3600)[0]
    assert later.forecast_fraction == pytest.approx(0.024, abs=1e-3)


def test_forecast_needs_min_samples() -> None:
    book = _landing_book()
    _spend(book, "a", 1.0, T0)
    assert book.views(ALICE, T0 + 61)[0].forecast_fraction == pytest.approx(0.1)


def test_forecast_triggers_downgrade_only_with_act_on_forecast() -> None:
    for act_on, expect in [("current", False), ("forecast", True)]:
        book = _landing_book(act_on)
        start = ts(2025, 3, 10, 0, 0)  # a whole day ahead
        for minute in range(5):
            _spend(book, f"m{minute}", 0.05, start + minute * 60)
        d = book.soft_landing(ALICE, start + 5 * 60)
        assert d.fraction < 0.05 and d.forecast_fraction > 0.8
        assert d.downgrade is expect
        if expect:
            assert d.message is not None and "by forecast" in d.message


# ---- snapshot -----------------------------------------------------------------------------


def test_snapshot_round_trip_and_reset_while_down() -> None:
    budgets = [
        BudgetConfig(scope="team", window="day", max_cost_usd=10.0),
        BudgetConfig(scope="global", window="month", max_tokens=10_000),
    ]
    book = BudgetBook(budgets)
    _spend(book, "a", 2.5, T0)
    book.reserve("inflight", ALICE, 1.0, 5, T0)
    data = book.snapshot()
    same_day = BudgetBook(budgets)
    assert same_day.restore(data, T0 + 60) == 2
    rows = {r["budget"]: r for r in same_day.admin(T0 + 60)}
    assert rows["team/day"]["spent_usd"] == pytest.approx(2.5)
    assert rows["team/day"]["reserved_usd"] == 0  # reservations are not persisted
    next_day = BudgetBook(budgets)
    next_day.restore(data, T0 + 86400)
    rows = {r["budget"]: r for r in next_day.admin(T0 + 86400)}
    assert rows["team/day"]["spent_usd"] == 0  # the day ended while we were down
    assert rows["global/month"]["spent_tokens"] == 1  # the month did not
    other = BudgetBook([BudgetConfig(scope="user", max_cost_usd=1)])
    assert other.restore(data, T0) == 0  # budgets no longer configured are dropped
    with pytest.raises(ValueError, match="version"):
        other.restore({"version": 99}, T0)


# ---- rate limits --------------------------------------------------------------------------


def test_rpm_refusal_with_retry_after() -> None:
    limiter = RateLimiter([RateLimitConfig(scope="key", rpm=3)])
    for i in range(3):
        assert limiter.check(ALICE, 10, T0 + i) is None
        limiter.commit(f"r{i}", ALICE, 10, T0 + i)
    refused = limiter.check(ALICE, 10, T0 + 10.5)
    assert refused is not None and refused.dimension == "rpm"
    assert refused.retry_after_s == pytest.approx(49.5)
    assert "3 requests per minute" in refused.message
    assert limiter.check(BOB, 10, T0 + 10) is None  # other keys have their own window
    assert limiter.check(ALICE, 10, T0 + 60) is None


def test_tpm_counts_worst_case_then_actual() -> None:
    limiter = RateLimiter([RateLimitConfig(scope="team", match="research", tpm=1000)])
    limiter.commit("a", ALICE, 900, T0)
    refused = limiter.check(ALICE, 200, T0 + 1)
    assert refused is not None and refused.dimension == "tpm"
    assert refused.retry_after_s == pytest.approx(59)
    limiter.adjust("a", 100, T0 + 2)  # it actually used 100 tokens
    assert limiter.check(ALICE, 200, T0 + 2) is None
    too_big = limiter.check(ALICE, 5000, T0 + 2)
    assert too_big is not None and too_big.retry_after_s == 60


# ---- the shared burn rate (redis backend) ----------------------------------------------------


def test_shared_burn_learns_the_rate_of_the_shared_spend() -> None:
    burn = SharedBurn(interval=60.0, alpha=0.3)
    day_start, end = 0.0, 86_400.0
    spend = 0.0
    for minute in range(10):  # all instances together spend 1 USD a minute
        burn.observe(minute * 60.0, day_start, spend, 0.0)
        spend += 1.0
    assert burn.samples == 9
    assert burn.rate_cost == pytest.approx(1 / 60)  # the first sample seeds it, as in Counter
    # before min_samples the forecast is the current fraction; after, spend + rate x time left
    assert burn.forecast(600.0, end, 10.0, 0.0, 1000.0, None, 10) == pytest.approx(0.01)
    expected = (10.0 + (end - 600.0) / 60) / 1000.0
    assert burn.forecast(600.0, end, 10.0, 0.0, 1000.0, None, 3) == pytest.approx(expected)
    # a total window has no end to forecast to
    assert burn.forecast(600.0, math.inf, 10.0, 0.0, 1000.0, None, 3) == pytest.approx(0.01)


def test_shared_burn_gaps_decay_new_windows_rebase_and_readings_never_go_negative() -> None:
    burn = SharedBurn(interval=60.0, alpha=0.5)
    burn.observe(0.0, 0.0, 0.0, 0.0)
    burn.observe(30.0, 0.0, 5.0, 50.0)  # inside the interval: nothing closes
    assert (burn.samples, burn.rate_cost) == (0, 0.0)
    burn.observe(60.0, 0.0, 6.0, 60.0)
    assert burn.samples == 1
    assert (burn.rate_cost, burn.rate_tokens) == pytest.approx((0.1, 1.0))
    burn.observe(660.0, 0.0, 6.0, 60.0)  # ten idle intervals: ten samples of nothing
    assert burn.samples == 11
    assert burn.rate_cost == pytest.approx(0.1 * 0.5**10)
    burn.observe(720.0, 0.0, 5.5, 60.0)  # a reading below the last one: a rate of 0, not < 0
    assert burn.rate_cost == pytest.approx(0.1 * 0.5**11)
    rate = burn.rate_cost
    # a new window: its spend so far (0.1 over the 80 s since the last reading) is the sample
    burn.observe(800.0, 86_400.0, 0.1, 1.0)
    assert burn.samples == 12 + 1
    assert burn.rate_cost == pytest.approx(0.5 * rate + 0.5 * 0.1 / 80)


def test_shared_burn_forgets_yesterday_after_a_quiet_night() -> None:
    """Spending fast until 23:00, then nothing until 09:00 in a new day window: the first
    request of the day must not be downgraded for yesterday's rate."""
    burn = SharedBurn(interval=60.0, alpha=0.3)
    day, hour = 86_400.0, 3_600.0
    for minute in range(121):  # 21:00 to 23:00, 1 USD a minute
        burn.observe(21 * hour + minute * 60, 0.0, float(minute), 0.0)
    assert burn.rate_cost == pytest.approx(1 / 60)
    burn.observe(day + 9 * hour, day, 0.0, 0.0)
    assert burn.forecast(day + 9 * hour, 2 * day, 0.0, 0.0, 1000.0, None, 3) < 1e-6
