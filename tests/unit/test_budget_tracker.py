"""BudgetTracker actor: concurrency without overshoot, cancel paths, 429s, persistence."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from sbactor.actors.budget_tracker import BudgetTracker, PreflightRequest
from sbactor.budget.config import (
    BudgetConfig,
    BudgetSettings,
    RateLimitConfig,
    SoftLandingConfig,
)
from sbactor.budget.scopes import RequestScopes

T0 = 1_741_608_000.0  # 2025-03-10T12:00:00Z
ALICE = RequestScopes(key_id="k1", user="alice", team="research", model="gpt-4o")


def clock() -> float:
    return T0 + trio.current_time()


@asynccontextmanager
async def running(tracker: BudgetTracker) -> AsyncIterator[BudgetTracker]:
    async with trio.open_nursery() as nursery:
        await nursery.start(tracker.run)
        try:
            yield tracker
        finally:
            await tracker.stop()


def make(budgets: list[BudgetConfig], **kw: object) -> BudgetTracker:
    return BudgetTracker(name="budget", budgets=budgets, clock=clock, **kw)  # type: ignore[arg-type]


def req(
    rid: str, cost: float, scopes: RequestScopes = ALICE, tokens: int = 100
) -> PreflightRequest:
    return PreflightRequest(rid, scopes, scopes.model or "gpt-4o", tokens // 2, tokens // 2, cost)


async def _row(tracker: BudgetTracker, budget: str) -> dict[str, object]:
    rows = {r["budget"]: r for r in await tracker.admin_snapshot()}
    return rows[budget]


@pytest.mark.parametrize("exact", [True, False])
async def test_200_concurrent_requests_never_overshoot(
    autojump_clock: trio.abc.Clock, exact: bool
) -> None:
    cost = 0.01
    cap = 50.5 * cost  # fits ~50 worst-case requests
    tracker = make([BudgetConfig(scope="team", max_cost_usd=cap)], capacity=16)
    rng = random.Random(7)
    served: list[float] = []

    async def one(i: int) -> None:
        rid = f"r{i}"
        await trio.sleep(rng.uniform(0, 5))  # arrivals spread over 5 s
        try:
            result = await tracker.preflight(req(rid, cost))
            if not result.ok:
                assert result.kind == "budget" and result.budget_exceeded
                return
            await trio.sleep(rng.uniform(0, 2))  # the upstream call
            actual = cost if exact else cost * rng.uniform(0.3, 1.0)
            served.append(actual)
            await tracker.reconcile(rid, actual, 80)
        finally:
            await tracker.reconcile(rid, 0.0, 0)  # the gateway's finally: a no-op here

    async with running(tracker):
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)
        row = await _row(tracker, "team/day")
    spent = float(row["spent_usd"])  # type: ignore[arg-type]
    overshoot = max(spent - cap, 0.0)
    print(f"served={len(served)} spent={spent:.4f} cap={cap:.4f} overshoot={overshoot:.6f}")
    assert row["reserved_usd"] == 0
    assert spent == pytest.approx(sum(served))
    assert overshoot == 0.0
    if exact:
        assert len(served) == 50
        assert cap - spent < cost  # within one request's cost of the cap


async def test_cancelled_caller_still_releases_its_reservation(
    autojump_clock: trio.abc.Clock,
) -> None:
    tracker = make([BudgetConfig(scope="global", max_cost_usd=1.0)])
    async with running(tracker):

        async def request() -> None:
            try:
                assert (await tracker.preflight(req("c1", 0.9))).ok
                await trio.sleep(100)  # upstream call; the client disconnects meanwhile
            finally:
                await tracker.reconcile("c1", 0.0, 0)  # shielded inside

        with trio.move_on_after(1):
            await request()
        row = await _row(tracker, "global/day")
        assert row["reserved_usd"] == 0 and row["spent_usd"] == 0
        assert (await tracker.preflight(req("c2", 1.0))).ok


async def test_failed_upstream_reconciles_zero(autojump_clock: trio.abc.Clock) -> None:
    tracker = make([BudgetConfig(scope="global", max_cost_usd=1.0)])
    async with running(tracker):
        with pytest.raises(RuntimeError):
            try:
                assert (await tracker.preflight(req("f1", 1.0))).ok
                raise RuntimeError("upstream 500")
            finally:
                tracker.reconcile_nowait("f1", 0.0, 0)
        assert (await tracker.preflight(req("f2", 1.0))).ok


async def test_budget_refusal_result_shape(autojump_clock: trio.abc.Clock) -> None:
    tracker = make([BudgetConfig(scope="team", match="research", max_cost_usd=1.0)])
    async with running(tracker):
        assert (await tracker.preflight(req("a", 0.7))).ok
        await tracker.reconcile("a", 0.7, 10)
        r = await tracker.preflight(req("b", 0.5))
    assert not r.ok and r.kind == "budget" and r.budget_exceeded
    assert r.scope == "team:research/day [team=research]"
    assert r.resets_at == "2025-03-11T00:00:00Z"
    assert r.headers()["Retry-After"] == str(12 * 3600)
    body = r.error_body()["error"]
    assert body["type"] == "budget_exceeded" and "0.7 of 1 USD" in body["message"]


async def test_rpm_and_tpm_refusals(autojump_clock: trio.abc.Clock) -> None:
    tracker = make(
        [BudgetConfig(scope="global", max_cost_usd=100)],
        rate_limits=[RateLimitConfig(scope="key", rpm=2), RateLimitConfig(scope="user", tpm=500)],
    )
    async with running(tracker):
        assert (await tracker.preflight(req("a", 0.01))).ok
        await trio.sleep(10)
        assert (await tracker.preflight(req("b", 0.01))).ok
        r = await tracker.preflight(req("c", 0.01))
        assert not r.ok and r.kind == "rate_limit" and not r.budget_exceeded
        assert r.headers()["Retry-After"] == "50"
        assert r.error_body()["error"]["type"] == "rate_limit_exceeded"
        # the refused request reserved nothing
        assert (await _row(tracker, "global/day"))["reserved_usd"] == pytest.approx(0.02)
        await trio.sleep(51)
        bob = RequestScopes(key_id="k9", user="alice")
        r = await tracker.preflight(req("d", 0.01, bob, tokens=450))
        assert not r.ok and r.kind == "rate_limit" and "tokens per minute" in (r.message or "")


async def test_soft_landing_downgrades_and_reserves_at_cheaper_price(
    autojump_clock: trio.abc.Clock,
) -> None:
    landing = SoftLandingConfig(warn_at=0.5, downgrade_at=0.9, downgrade_to="gpt-4o-mini")
    tracker = make(
        [BudgetConfig(scope="team", max_cost_usd=1.0, soft_landing=landing)],
        estimator=lambda model, i, o: 0.01 if model == "gpt-4o-mini" else None,
    )
    async with running(tracker):
        r = await tracker.preflight(req("a", 0.6))
        assert r.ok and not r.warn
        await tracker.reconcile("a", 0.6, 10)
        r = await tracker.preflight(req("b", 0.3))
        assert r.ok and r.warn and not r.downgrade
        assert "60%" in r.headers()["x-sbactor-budget-warning"]
        await tracker.reconcile("b", 0.3, 10)
        # 0.9 spent: a 0.2 worst case would not fit, but its downgraded form does
        r = await tracker.preflight(req("c", 0.2))
        assert r.ok and r.downgrade and r.downgrade_to == "gpt-4o-mini"
        assert r.reserved_usd == 0.01
        assert r.policy_view()["downgrade_to"] == "gpt-4o-mini"
        assert tracker.statistics().state["downgrades"] == 1


async def test_forecast_triggered_downgrade(autojump_clock: trio.abc.Clock) -> None:
    landing = SoftLandingConfig(warn_at=0.8, downgrade_at=0.9, act_on="forecast")
    settings = BudgetSettings(forecast_interval_s=60, forecast_min_samples=3)
    tracker = make(
        [BudgetConfig(scope="team", max_cost_usd=10.0, soft_landing=landing)], settings=settings
    )
    async with running(tracker):
        for i in range(3):  # $0.05 a minute: ~$36 by the end of the day (12 h left)
            r = await tracker.preflight(req(f"m{i}", 0.05))
            assert r.ok and not r.downgrade
            await tracker.reconcile(f"m{i}", 0.05, 10)
            await trio.sleep(60)
        r = await tracker.preflight(req("next", 0.05))
    assert r.fraction < 0.05 and r.forecast_fraction > 0.9
    assert r.downgrade and r.downgrade_to is None  # the gateway picks the cheapest


async def test_ttl_releases_reservations_never_reconciled(
    autojump_clock: trio.abc.Clock,
) -> None:
    settings = BudgetSettings(reservation_ttl_s=60, snapshot_path="")
    tracker = make([BudgetConfig(scope="global", max_cost_usd=1.0)], settings=settings)
    async with running(tracker):
        assert (await tracker.preflight(req("lost", 1.0))).ok
        assert not (await tracker.preflight(req("x", 0.1))).ok
        await trio.sleep(90)
        assert (await tracker.preflight(req("y", 0.1))).ok
        assert tracker.statistics().state["expired_reservations"] == 1


async def test_restart_keeps_counters(autojump_clock: trio.abc.Clock, tmp_path: Path) -> None:
    budgets = [BudgetConfig(scope="team", max_cost_usd=1.0)]
    settings = BudgetSettings(snapshot_interval_s=5)
    path = tmp_path / "budgets.json"

    def build() -> BudgetTracker:
        tracker = BudgetTracker.from_config(budgets, [], settings, tmp_path)
        tracker.clock = clock
        return tracker

    first = build()
    assert first.snapshot_file == path
    async with running(first):
        assert (await first.preflight(req("a", 0.4))).ok
        await first.reconcile("a", 0.4, 100)
        await trio.sleep(6)
        for _ in range(1000):  # the write runs in a worker thread, outside virtual time
            if path.exists():
                break
            await trio.sleep(0.001)
        assert path.exists()  # periodic snapshot, before any stop
    data = json.loads(path.read_text())
    assert data["counters"][0]["spent_cost"] == pytest.approx(0.4)
    second = build()
    async with running(second):
        row = await _row(second, "team/day")
        assert row["spent_usd"] == pytest.approx(0.4)
        assert not (await second.preflight(req("b", 0.7))).ok


async def test_corrupt_snapshot_starts_empty(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    (tmp_path / "budgets.json").write_text("{not json")
    tracker = BudgetTracker.from_config(
        [BudgetConfig(scope="global", max_cost_usd=1.0)], [], BudgetSettings(), tmp_path
    )
    async with running(tracker):
        assert (await tracker.preflight(req("a", 0.5))).ok


def test_shared_tracker_forgets_holds_whose_reconcile_never_came() -> None:
    from sbactor.state.budget import STALE_HOLD_TTLS, SharedBudgetTracker, _Held

    now = [T0]
    tracker = SharedBudgetTracker(
        name="budget", budgets=[BudgetConfig(scope="global", max_cost_usd=10.0)],
        settings=BudgetSettings(reservation_ttl_s=60), clock=lambda: now[0],
    )
    horizon = STALE_HOLD_TTLS * 60

    def held(at: float) -> _Held:
        return _Held("m", (), (), (), 1, int(at), ALICE)

    tracker._held.update({"old": held(T0), "new": held(T0 + 100)})
    tracker._local.update({"old-local": (ALICE, T0), "new-local": (ALICE, T0 + 100)})
    assert tracker._forget_stale(T0 + horizon) == 0  # not older than the horizon yet
    assert tracker._forget_stale(T0 + horizon + 1) == 2
    assert set(tracker._held) == {"new"} and set(tracker._local) == {"new-local"}
    assert tracker.state_summary()["forgotten_holds"] == 2
