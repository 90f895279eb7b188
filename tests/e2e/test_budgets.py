"""Predictive budgets end to end: real gateway, real mock upstream, real HTTP.

Costs are made exact so the assertions are too: the mock always answers the same 40 characters
(10 completion tokens), requests carry ``max_tokens: 10`` and most models price only output, so
one served request of model ``m`` costs exactly ``COST`` and its worst case is the same amount.
Time-dependent behaviour (forecast) drives the BudgetTracker's injectable wall clock instead of
sleeping.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from pathlib import Path
from typing import Any

import httpx2
import orjson
import trio
import yaml

from sbactor.config import parse_config
from tests.conftest import REPO, MockUpstream, RunningGateway, StartGateway, StartMock

REPLY = "x" * 40  # the mock's fixed answer: (40 + 3) // 4 = 10 completion tokens
MAX_TOKENS = 10
PRICE_OUT = 1000.0  # USD per Mtok of output for model m: one request costs 0.01
COST = MAX_TOKENS * PRICE_OUT / 1e6
CHEAP_PRICE_OUT = 100.0  # model "cheap": a tenth of m
ADMIN = {"x-admin-key": "adm"}
EXAMPLE = REPO / "examples" / "predictive-budgets"
NOON = dt.datetime(2030, 3, 1, 12, 0, tzinfo=dt.UTC).timestamp()


def _key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def _config(mock: MockUpstream, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "server": {"auth": "off", "admin_key": "adm"},
        "providers": [{"name": "up", "type": "openai", "base_url": mock.openai_base,
                       "api_key": "test"}],
        "models": [
            {"name": "m", "deployments": [{"provider": "up", "model": "up-m",
                                          "price": {"output_per_mtok": PRICE_OUT}}]},
            {"name": "cheap", "deployments": [{"provider": "up", "model": "up-cheap",
                                              "price": {"output_per_mtok": CHEAP_PRICE_OUT}}]},
        ],
        "usage_sinks": [{"type": "jsonl", "path": "usage.jsonl"}],
    }
    config.update(sections)
    return config


async def _chat(gw: RunningGateway, content: str = "hello", **fields: Any) -> httpx2.Response:
    headers = fields.pop("headers", None)
    body = {"model": "m", "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": content}], **fields}
    return await gw.client.post("/v1/chat/completions", json=body, headers=headers)


async def _rows(gw: RunningGateway) -> dict[str, dict[str, Any]]:
    r = await gw.client.get("/admin/budgets", headers=ADMIN)
    assert r.status_code == 200, r.text
    return {f"{row['budget']}|{row['value']}": row for row in r.json()["budgets"]}


async def _events(gw: RunningGateway, count: int) -> list[dict[str, Any]]:
    """The usage events once the jsonl sink holds at least ``count`` of them."""
    path = gw.data_dir / "usage.jsonl"
    with trio.fail_after(10):
        while True:
            if path.exists():
                lines = path.read_bytes().splitlines()
                if len(lines) >= count:
                    return [orjson.loads(line) for line in lines]
            await trio.sleep(0.01)


async def _until_released(gw: RunningGateway, key: str) -> dict[str, Any]:
    """Poll ``/admin/budgets`` until the counter holds no reservation (bounded)."""
    with trio.fail_after(10):
        while True:
            row = (await _rows(gw))[key]
            if row["reserved_usd"] == 0 and row["reserved_tokens"] == 0:
                return row
            await trio.sleep(0.01)


class FakeWallClock:
    """Epoch seconds that move only when the test says so (the tracker's injectable clock)."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


# ---- hard cap ---------------------------------------------------------------------------


async def test_hard_cap_refuses_with_scope_reset_time_and_refusal_event(
    start_gateway: StartGateway, start_mock: StartMock
) -> None:
    mock = await start_mock(reply=REPLY)
    budget = {"name": "daily", "scope": "global", "window": "day", "max_cost_usd": 2.5 * COST}
    gw = await start_gateway(_config(mock, budgets=[budget]))
    assert gw.gateway.budgets is not None
    gw.gateway.budgets.clock = FakeWallClock(NOON)
    for _ in range(2):
        r = await _chat(gw)
        assert r.status_code == 200, r.text
        assert math.isclose(float(r.headers["x-sbactor-cost-usd"]), COST)
    before = len(mock.received())

    r = await _chat(gw, headers={"x-request-id": "over-cap"})
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["type"] == "budget_exceeded"
    assert error["code"] == "budget_exceeded"
    assert "daily" in error["message"]  # which budget
    resets = error["message"].split("resets at ")[1]
    assert resets == "2030-03-02T00:00:00Z"  # the next UTC midnight
    assert r.headers["retry-after"] == str(12 * 3600)
    assert r.headers["x-request-id"] == "over-cap"
    assert len(mock.received()) == before  # the upstream never saw it

    events = await _events(gw, 3)
    refusal = next(e for e in events if e["request_id"] == "over-cap")
    assert refusal["kind"] == "refusal"
    assert refusal["status"] == 429
    assert refusal["cost_usd"] == 0
    assert refusal["refusal"]["stage"] == "budget"
    assert refusal["refusal"]["scope"] == "daily"
    assert refusal["refusal"]["resets_at"] == resets
    assert refusal["budget"]["fraction"] == 0.8  # 2 of 2.5 spent when it was refused
    row = (await _rows(gw))["daily|*"]
    assert math.isclose(row["spent_usd"], 2 * COST)
    assert row["reserved_usd"] == 0


async def test_request_that_can_never_fit_has_no_retry_after(
    start_gateway: StartGateway, start_mock: StartMock
) -> None:
    mock = await start_mock(reply=REPLY)
    budget = {"name": "small", "scope": "global", "window": "total", "max_cost_usd": COST}
    gw = await start_gateway(_config(mock, budgets=[budget]))
    r = await _chat(gw, max_tokens=MAX_TOKENS * 2)  # worst case is twice the cap
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "budget_exceeded"
    assert "never resets" in r.json()["error"]["message"]
    assert "retry-after" not in r.headers
    assert mock.received() == []


# ---- concurrency ------------------------------------------------------------------------


async def test_200_concurrent_requests_never_overshoot_the_cap(
    start_gateway: StartGateway, start_mock: StartMock
) -> None:
    mock = await start_mock(reply=REPLY)
    config = _config(mock)
    # Input is priced too: the pre-flight estimate (chars/4 + overheads) must cover it.
    config["models"][0]["deployments"][0]["price"]["input_per_mtok"] = 10.0
    content = "concurrent request"  # same length for all: one worst case for all
    estimated_in = math.ceil(len(content) / 4) + 4 + 3
    worst = (estimated_in * 10.0 + MAX_TOKENS * PRICE_OUT) / 1e6
    cap = 50.5 * worst
    config["budgets"] = [{"name": "cap", "scope": "global", "window": "day", "max_cost_usd": cap}]
    gw = await start_gateway(config)
    statuses: list[int] = []
    limits = httpx2.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx2.AsyncClient(base_url=gw.url, timeout=30, limits=limits) as client:

        async def one() -> None:
            r = await client.post("/v1/chat/completions", json={
                "model": "m", "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": content}]})
            assert r.status_code in (200, 429), r.text
            if r.status_code == 429:
                assert r.json()["error"]["type"] == "budget_exceeded"
            statuses.append(r.status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(one)

    served = statuses.count(200)
    events = await _events(gw, 200)
    spent = sum(e["cost_usd"] for e in events)
    completions = [e for e in events if e["kind"] == "completion"]
    refusals = [e for e in events if e["kind"] == "refusal"]
    overshoot = max(spent - cap, 0.0)
    print(f"\ncap={cap:.6f} worst_case={worst:.6f} served={served} refused={len(refusals)} "
          f"recorded_spend={spent:.6f} overshoot={overshoot:.6f} unused={cap - spent:.6f}")
    assert len(completions) == served and len(refusals) == 200 - served
    assert all(e["budget"] is not None and e["refusal"]["stage"] == "budget" for e in refusals)
    assert spent <= cap  # never overshoots
    assert cap - spent < worst  # served up to within one request's cost of the cap
    assert served == 50
    row = (await _rows(gw))["cap|*"]
    assert math.isclose(row["spent_usd"], spent, rel_tol=1e-6)
    assert row["reserved_usd"] == 0


# ---- soft landing -----------------------------------------------------------------------


async def test_soft_landing_warns_then_downgrades(
    start_gateway: StartGateway, start_mock: StartMock
) -> None:
    mock = await start_mock(reply=REPLY)
    budget = {
        "name": "landing", "scope": "global", "window": "day", "max_cost_usd": 10 * COST,
        "soft_landing": {"warn_at": 0.5, "downgrade_at": 0.8, "downgrade_to": "cheap"},
    }
    gw = await start_gateway(_config(mock, budgets=[budget]))
    seen = []
    for i in range(10):  # fraction before request i is i/10 (sequential: nothing in flight)
        r = await _chat(gw, headers={"x-request-id": f"r{i}"})
        assert r.status_code == 200, r.text
        seen.append((r.headers.get("x-sbactor-budget-warning"), r.headers["x-sbactor-model"],
                     mock.received()[-1]["model"]))
    for i, (warning, served_model, upstream_model) in enumerate(seen):
        if i < 5:
            assert warning is None, i
        else:
            assert warning and "landing" in warning, i
        if i < 8:
            assert (served_model, upstream_model) == ("m", "up-m"), i
        else:  # past downgrade_at: the upstream gets the downgrade_to model's deployment
            assert (served_model, upstream_model) == ("cheap", "up-cheap"), i
            assert "downgraded to cheap" in str(warning)
    events = {e["request_id"]: e for e in await _events(gw, 10)}
    for i in range(10):
        event = events[f"r{i}"]
        tagged = "budget_soft_landing" in event["tags"]
        assert tagged == (i >= 8), i
        if tagged:
            assert event["routed_model"] == "cheap"
            assert event["requested_model"] == "m"
            assert event["budget"]["downgraded_from"] == "m"
            assert math.isclose(event["cost_usd"], COST * CHEAP_PRICE_OUT / PRICE_OUT)
    row = (await _rows(gw))["landing|*"]
    assert math.isclose(row["spent_usd"], 8 * COST + 2 * COST / 10)


async def test_forecast_downgrades_before_the_spend_gets_near_the_cap(
    start_gateway: StartGateway, start_mock: StartMock
) -> None:
    mock = await start_mock(reply=REPLY)
    budget = {
        "name": "burn", "scope": "global", "window": "day", "max_cost_usd": 100 * COST,
        "soft_landing": {"warn_at": 0.5, "downgrade_at": 0.9, "downgrade_to": "cheap",
                         "act_on": "forecast"},
    }
    settings = {"forecast_interval_s": 60, "forecast_min_samples": 3, "snapshot_path": ""}
    gw = await start_gateway(_config(mock, budgets=[budget], budget_settings=settings))
    assert gw.gateway.budgets is not None
    clock = FakeWallClock(NOON)
    gw.gateway.budgets.clock = clock

    # One request per minute at noon: 1 % of the cap per minute, 12 h left in the day.
    for i in range(3):
        r = await _chat(gw)
        assert r.status_code == 200
        assert "x-sbactor-budget-warning" not in r.headers, i  # too few samples to forecast
        assert mock.received()[-1]["model"] == "up-m"
        clock.now += 60
    r = await _chat(gw, headers={"x-request-id": "forecast"})
    assert r.status_code == 200
    assert mock.received()[-1]["model"] == "up-cheap"
    assert "forecast" in r.headers["x-sbactor-budget-warning"]
    event = next(e for e in await _events(gw, 4) if e["request_id"] == "forecast")
    assert "budget_soft_landing" in event["tags"]
    assert event["budget"]["fraction"] < 0.05  # the spend itself is nowhere near the cap
    assert event["budget"]["forecast_fraction"] > 0.9
    row = (await _rows(gw))["burn|*"]
    assert row["fraction"] < 0.05 < 1 < row["forecast_fraction"]
    assert row["burn_rate_usd_per_hour"] > 0

    # The team stops spending: idle intervals decay the burn rate, no more downgrade.
    clock.now += 2 * 3600
    r = await _chat(gw)
    assert r.status_code == 200
    assert mock.received()[-1]["model"] == "up-m"
    assert "x-sbactor-budget-warning" not in r.headers


# ---- rate limits ------------------------------------------------------------------------


async def test_rpm_and_tpm_limits_answer_429_with_retry_after(
    start_gateway: StartGateway, start_mock: StartMock
) -> None:
    mock = await start_mock(reply=REPLY)
    config = _config(
        mock,
        server={"auth": "keys", "admin_key": "adm"},
        keys=[{"id": "alice", "key_sha256": _key("sk-alice"), "user": "alice", "team": "research"},
              {"id": "bob", "key_sha256": _key("sk-bob"), "user": "bob", "team": "ops"}],
        rate_limits=[{"scope": "key", "match": "alice", "rpm": 2},
                     {"scope": "team", "match": "ops", "tpm": 100}],
    )
    gw = await start_gateway(config)
    alice = {"authorization": "Bearer sk-alice"}
    bob = {"authorization": "Bearer sk-bob"}

    for _ in range(2):
        assert (await _chat(gw, "hi", headers=alice)).status_code == 200
    r = await _chat(gw, "hi", headers={**alice, "x-request-id": "rpm"})
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "rate_limit_exceeded"
    assert "2 requests per minute" in r.json()["error"]["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert (await _chat(gw, "hi", headers=bob)).status_code == 200  # bob has no rpm limit

    # tpm: admitted at the worst case (8 estimated + 90), settled at the actual 4 + 10 tokens;
    # a second worst case of 98 no longer fits into 100.
    r = await _chat(gw, "hi", headers={**bob, "x-request-id": "tpm"}, max_tokens=90)
    assert r.status_code == 429
    assert "100 tokens per minute" in r.json()["error"]["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert (await _chat(gw, "hi", headers=bob, max_tokens=70)).status_code == 200

    events = {e["request_id"]: e for e in await _events(gw, 6)}
    for rid in ("rpm", "tpm"):
        assert events[rid]["kind"] == "refusal"
        assert events[rid]["refusal"]["stage"] == "rate_limit"
        assert events[rid]["status"] == 429
    assert len(mock.received()) == 4


# ---- admin view and persistence ---------------------------------------------------------


async def test_admin_budgets_lists_every_counter(
    start_gateway: StartGateway, start_mock: StartMock
) -> None:
    mock = await start_mock(reply=REPLY)
    config = _config(
        mock,
        server={"auth": "keys", "admin_key": "adm"},
        keys=[{"id": "ka", "key_sha256": _key("sk-a"), "team": "a"},
              {"id": "kb", "key_sha256": _key("sk-b"), "team": "b"}],
        budgets=[{"scope": "team", "window": "hour", "max_cost_usd": 10 * COST},
                 {"scope": "global", "window": "month", "max_tokens": 1000}],
    )
    gw = await start_gateway(config)
    assert (await gw.client.get("/admin/budgets")).status_code == 401
    assert (await _chat(gw, headers={"authorization": "Bearer sk-a"})).status_code == 200
    for _ in range(2):
        assert (await _chat(gw, headers={"authorization": "Bearer sk-b"})).status_code == 200
    rows = await _rows(gw)
    assert set(rows) == {"team/hour|a", "team/hour|b", "global/month|*"}
    a, b, total = rows["team/hour|a"], rows["team/hour|b"], rows["global/month|*"]
    assert (a["scope"], a["window"], a["rolling"]) == ("team", "hour", False)
    assert math.isclose(a["spent_usd"], COST) and math.isclose(b["spent_usd"], 2 * COST)
    assert math.isclose(b["fraction"], 0.2)
    assert b["max_cost_usd"] == 10 * COST and b["max_tokens"] is None
    assert b["reserved_usd"] == 0 and b["reserved_tokens"] == 0
    assert b["forecast_fraction"] >= b["fraction"]
    assert b["resets_at"].endswith(":00:00Z")
    tokens = sum(e["total_tokens"] for e in await _events(gw, 3))
    assert total["spent_tokens"] == tokens and total["max_tokens"] == 1000
    assert math.isclose(total["fraction"], tokens / 1000, abs_tol=1e-6)
    assert total["resets_at"].endswith("T00:00:00Z")


async def test_restart_keeps_the_counters(
    start_gateway: StartGateway, start_mock: StartMock, tmp_path: Path
) -> None:
    mock = await start_mock(reply=REPLY)
    budget = {"name": "daily", "scope": "global", "window": "day", "max_cost_usd": 2.5 * COST}
    config = _config(mock, budgets=[budget])
    data_dir = tmp_path / "state"
    first = await start_gateway(config, data_dir=data_dir)
    for _ in range(2):
        assert (await _chat(first)).status_code == 200
    tracker = first.gateway.budgets
    assert tracker is not None
    await first.client.aclose()  # idle keep-alive connections would hold the drain open
    await first.stop()
    with trio.fail_after(10):
        await tracker.stop()  # returns once on_stop has written the snapshot
    assert (data_dir / "budgets.json").exists()

    second = await start_gateway(config, data_dir=data_dir)
    row = (await _rows(second))["daily|*"]
    assert math.isclose(row["spent_usd"], 2 * COST)
    assert row["reserved_usd"] == 0
    r = await _chat(second)  # a fresh counter would serve it
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "budget_exceeded"


# ---- reservations never leak ------------------------------------------------------------


async def test_reservation_released_when_the_upstream_fails(
    start_gateway: StartGateway, start_mock: StartMock
) -> None:
    mock = await start_mock(reply=REPLY)
    budget = {"name": "daily", "scope": "global", "window": "day", "max_cost_usd": 10 * COST}
    config = _config(mock, budgets=[budget],
                     resilience={"retry_policy": {"server_error": 1}, "backoff_base_s": 0.001,
                                 "backoff_max_s": 0.001})
    gw = await start_gateway(config)
    r = await _chat(gw, "fail [mock:status=503]", headers={"x-request-id": "failed"})
    assert r.status_code >= 500
    assert len(mock.received()) == 2  # first attempt + one retry, one reservation throughout
    row = await _until_released(gw, "daily|*")
    assert row["spent_usd"] == 0
    event = next(e for e in await _events(gw, 1) if e["request_id"] == "failed")
    assert event["kind"] == "error" and event["cost_usd"] == 0
    # the whole cap is available again: ten requests of COST fit
    for _ in range(10):
        assert (await _chat(gw)).status_code == 200
    assert (await _chat(gw)).status_code == 429


async def test_reservation_released_when_the_client_disconnects_mid_stream(
    start_gateway: StartGateway, start_mock: StartMock
) -> None:
    mock = await start_mock(reply="one two three four five six seven eight")
    budget = {"name": "daily", "scope": "global", "window": "day", "max_cost_usd": 10 * COST}
    gw = await start_gateway(_config(mock, budgets=[budget]))
    # The mock holds the stream open after the first event until we hang up.
    body = {"model": "m", "max_tokens": MAX_TOKENS, "stream": True,
            "messages": [{"role": "user", "content": "stream [mock:stall=600000]"}]}
    async with gw.client.stream("POST", "/v1/chat/completions", json=body,
                                headers={"x-request-id": "gone"}) as r:
        assert r.status_code == 200
        lines = r.aiter_lines()  # kept open: closing the iterator would close the connection
        while not (await anext(lines)).startswith("data: "):
            pass  # until the first chunk; the call is in flight
        row = (await _rows(gw))["daily|*"]
        assert math.isclose(row["reserved_usd"], COST)  # the worst case is held meanwhile
        usage = gw.data_dir / "usage.jsonl"
        assert not usage.exists() or usage.read_bytes() == b""  # nothing settled yet
        await r.aclose()  # hang up mid-stream
    row = await _until_released(gw, "daily|*")
    event = next(e for e in await _events(gw, 1) if e["request_id"] == "gone")
    assert event["client_disconnected"] is True
    assert event["status"] == 499
    assert math.isclose(row["spent_usd"], event["cost_usd"], abs_tol=1e-9)
    assert event["cost_usd"] < COST  # only what was streamed before the hang-up


# ---- the example config -----------------------------------------------------------------


async def test_example_config_serves_warns_downgrades_and_refuses(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    data = yaml.safe_load((EXAMPLE / "sbactor.yaml").read_text())
    config = parse_config(data, env={"MOCK_UPSTREAM_URL": mock_upstream.openai_base})
    gw = await start_gateway(config)
    alice = {"authorization": "Bearer sk-demo-alice"}
    body = {"model": "gpt-4o", "max_tokens": 64,
            "messages": [{"role": "user", "content": "Summarise our Q3 numbers"}]}
    models, warned = [], False
    for _ in range(14):
        r = await gw.client.post("/v1/chat/completions", json=body, headers=alice)
        assert r.status_code == 200, r.text
        models.append(mock_upstream.received()[-1]["model"])
        warned = warned or "x-sbactor-budget-warning" in r.headers
    assert models[0] == "gpt-4o"
    assert models[-1] == "gpt-4o-mini"  # soft landing kicked in before the cap
    assert warned
    big = {**body, "max_tokens": 4000}
    r = await gw.client.post("/v1/chat/completions", json=big, headers=alice)
    assert r.status_code == 429 and r.json()["error"]["type"] == "budget_exceeded"
    # bob is another team: untouched by research's budget
    r = await gw.client.post("/v1/chat/completions", json=body,
                             headers={"authorization": "Bearer sk-demo-bob"})
    assert r.status_code == 200 and "x-sbactor-budget-warning" not in r.headers
    r = await gw.client.get("/admin/budgets", headers={"x-admin-key": "admin-demo"})
    assert r.status_code == 200
    assert {row["budget"] for row in r.json()["budgets"]} >= {"research-daily"}


async def test_demo_config_budgets(start_gateway: StartGateway) -> None:
    data = yaml.safe_load((REPO / "sbactor" / "demo.yaml").read_text())
    gw = await start_gateway(parse_config(data, env={}))
    r = await gw.client.post("/v1/chat/completions", json={
        "model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]})
    assert r.status_code == 200, r.text
    rows = {row["budget"]: row for row in (await gw.client.get("/admin/budgets")).json()["budgets"]}
    assert set(rows) == {"demo-global-daily", "demo-gpt-4o-daily"}
    for row in rows.values():
        assert row["spent_usd"] > 0 and row["reserved_usd"] == 0
    assert rows["demo-gpt-4o-daily"]["value"] == "gpt-4o"
